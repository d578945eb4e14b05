"""EBML primitives: element IDs, variable-length integers, element encoding.

Pure functions over bytes; the streaming reader, the Connect fragment writer
and the emulator's KVS media endpoint all build on these.
"""

from __future__ import annotations

from collections.abc import Iterable

# Element IDs (with their length-marker bits, as written on the wire).
EBML = 0x1A45DFA3
EBML_VERSION = 0x4286
EBML_READ_VERSION = 0x42F7
EBML_MAXID_LENGTH = 0x42F2
EBML_MAX_SIZE_LENGTH = 0x42F3
DOC_TYPE = 0x4282
DOC_TYPE_VERSION = 0x4287
DOC_TYPE_READ_VERSION = 0x4285
VOID = 0xEC
CRC32 = 0xBF

SEGMENT = 0x18538067
SEEK_HEAD = 0x114D9B74
INFO = 0x1549A966
SEGMENT_UID = 0x73A4
TIMECODE_SCALE = 0x2AD7B1
TITLE = 0x7BA9
MUXING_APP = 0x4D80
WRITING_APP = 0x5741
TRACKS = 0x1654AE6B
TRACK_ENTRY = 0xAE
TRACK_NUMBER = 0xD7
TRACK_UID = 0x73C5
TRACK_TYPE = 0x83
NAME = 0x536E
CODEC_ID = 0x86
CODEC_PRIVATE = 0x63A2
AUDIO = 0xE1
SAMPLING_FREQUENCY = 0xB5
CHANNELS = 0x9F
CLUSTER = 0x1F43B675
TIMECODE = 0xE7
POSITION = 0xA7
PREV_SIZE = 0xAB
SIMPLE_BLOCK = 0xA3
BLOCK_GROUP = 0xA0
BLOCK = 0xA1
CUES = 0x1C53BB6B
CHAPTERS = 0x1043A770
ATTACHMENTS = 0x1941A469
TAGS = 0x1254C367
TAG = 0x7373
SIMPLE_TAG = 0x67C8
TAG_NAME = 0x45A3
TAG_STRING = 0x4487

# Children of a Segment; an unknown-size Cluster ends where one of these (or a
# new EBML header / Segment) starts.
SEGMENT_CHILDREN = frozenset(
    {SEEK_HEAD, INFO, TRACKS, CLUSTER, CUES, CHAPTERS, ATTACHMENTS, TAGS, VOID, CRC32}
)
TOP_LEVEL = frozenset({EBML, SEGMENT})

UNKNOWN_SIZE = -1


class NeedMoreData(Exception):
    """The buffer ends inside the item being read; feed more bytes and retry."""


class InvalidEbml(ValueError):
    """Bytes that cannot be EBML at this position (reason says why)."""


def read_id(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """Read an element ID at `pos`; return (id with marker bits, length in bytes)."""
    if pos >= len(buf):
        raise NeedMoreData
    first = buf[pos]
    if first >= 0x80:
        return first, 1
    if first >= 0x40:
        length = 2
    elif first >= 0x20:
        length = 3
    elif first >= 0x10:
        length = 4
    else:
        raise InvalidEbml(f"invalid element ID first byte 0x{first:02X} at offset {pos}")
    if pos + length > len(buf):
        raise NeedMoreData
    return int.from_bytes(buf[pos : pos + length], "big"), length


def read_size(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """Read an element data size at `pos`; return (size or UNKNOWN_SIZE, length)."""
    if pos >= len(buf):
        raise NeedMoreData
    first = buf[pos]
    if first == 0:
        raise InvalidEbml(f"invalid size VINT (0x00) at offset {pos}")
    length = 9 - first.bit_length()
    if pos + length > len(buf):
        raise NeedMoreData
    value = first & (0xFF >> length)
    all_ones = value == (0xFF >> length)
    for i in range(1, length):
        byte = buf[pos + i]
        value = (value << 8) | byte
        all_ones = all_ones and byte == 0xFF
    return (UNKNOWN_SIZE if all_ones else value), length


def encode_id(element_id: int) -> bytes:
    """Wire bytes of an element ID (IDs already carry their marker bits)."""
    return element_id.to_bytes((element_id.bit_length() + 7) // 8, "big")


def encode_size(size: int, length: int | None = None) -> bytes:
    """Encode a data size as a VINT; `UNKNOWN_SIZE` gives the 8-byte all-ones form."""
    if size == UNKNOWN_SIZE:
        return b"\x01\xff\xff\xff\xff\xff\xff\xff"
    if length is None:
        length = 1
        while size >= (1 << (7 * length)) - 1:
            length += 1
    if size >= (1 << (7 * length)) - 1:
        raise ValueError(f"size {size} does not fit a {length}-byte VINT")
    return (size | (1 << (7 * length))).to_bytes(length, "big")


def element(element_id: int, payload: bytes, size_length: int | None = None) -> bytes:
    """One complete element: ID, size, payload."""
    return encode_id(element_id) + encode_size(len(payload), size_length) + payload


def uint_element(element_id: int, value: int, width: int | None = None) -> bytes:
    """An unsigned-integer element, minimal width unless `width` is given."""
    if width is None:
        width = max(1, (value.bit_length() + 7) // 8)
    return element(element_id, value.to_bytes(width, "big"))


def str_element(element_id: int, value: str) -> bytes:
    """A string element (UTF-8, no padding)."""
    return element(element_id, value.encode("utf-8"))


def ebml_header(doc_type: str = "matroska", version: int = 2) -> bytes:
    """The EBML header Kinesis Video writes before every Segment."""
    return element(
        EBML,
        uint_element(EBML_VERSION, 1)
        + uint_element(EBML_READ_VERSION, 1)
        + uint_element(EBML_MAXID_LENGTH, 4)
        + uint_element(EBML_MAX_SIZE_LENGTH, 8)
        + str_element(DOC_TYPE, doc_type)
        + uint_element(DOC_TYPE_VERSION, version)
        + uint_element(DOC_TYPE_READ_VERSION, version),
    )


def simple_tag(name: str, value: str) -> bytes:
    """A SimpleTag element (TagName + TagString)."""
    return element(SIMPLE_TAG, str_element(TAG_NAME, name) + str_element(TAG_STRING, value))


def tags_element(pairs: Iterable[tuple[str, str]]) -> bytes:
    """One top-level Tags element holding one Tag with a SimpleTag per pair."""
    body = b"".join(simple_tag(name, value) for name, value in pairs)
    return element(TAGS, element(TAG, body))


# Added for the streaming reader: the remaining Cluster children, and names
# for error messages.
SILENT_TRACKS = 0x5854
ENCRYPTED_BLOCK = 0xAF
REFERENCE_BLOCK = 0xFB

CLUSTER_CHILDREN = frozenset(
    {TIMECODE, SILENT_TRACKS, POSITION, PREV_SIZE, SIMPLE_BLOCK, BLOCK_GROUP, ENCRYPTED_BLOCK}
    | {VOID, CRC32}
)

ELEMENT_NAMES: dict[int, str] = {
    EBML: "EBML",
    EBML_VERSION: "EBMLVersion",
    DOC_TYPE: "DocType",
    VOID: "Void",
    CRC32: "CRC-32",
    SEGMENT: "Segment",
    SEEK_HEAD: "SeekHead",
    INFO: "Info",
    TIMECODE_SCALE: "TimecodeScale",
    TRACKS: "Tracks",
    TRACK_ENTRY: "TrackEntry",
    TRACK_NUMBER: "TrackNumber",
    TRACK_UID: "TrackUID",
    TRACK_TYPE: "TrackType",
    NAME: "Name",
    CODEC_ID: "CodecID",
    CODEC_PRIVATE: "CodecPrivate",
    AUDIO: "Audio",
    SAMPLING_FREQUENCY: "SamplingFrequency",
    CHANNELS: "Channels",
    CLUSTER: "Cluster",
    TIMECODE: "Timecode",
    POSITION: "Position",
    SIMPLE_BLOCK: "SimpleBlock",
    BLOCK_GROUP: "BlockGroup",
    BLOCK: "Block",
    REFERENCE_BLOCK: "ReferenceBlock",
    CUES: "Cues",
    CHAPTERS: "Chapters",
    ATTACHMENTS: "Attachments",
    TAGS: "Tags",
    TAG: "Tag",
    SIMPLE_TAG: "SimpleTag",
    TAG_NAME: "TagName",
    TAG_STRING: "TagString",
}


def element_name(element_id: int) -> str:
    """A readable name for an element ID, for messages ("element 0x1234" if unknown)."""
    return ELEMENT_NAMES.get(element_id, f"element 0x{element_id:X}")


# VINT length by first byte (0: invalid), ID length (IDs are at most 4 bytes),
# and the value mask of a VINT by its length.
VINT_LENGTH = bytes([0] + [9 - b.bit_length() for b in range(1, 256)])
ID_LENGTH = bytes(n if n <= 4 else 0 for n in VINT_LENGTH)
VINT_MASK = tuple((1 << (7 * n)) - 1 for n in range(9))


def read_element_header(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int, int]:
    """Read an element's ID and size at `pos`: (id, size or UNKNOWN_SIZE, header length).

    The same rules as `read_id` then `read_size`, in one table-driven call for
    hot loops.
    """
    try:
        first = buf[pos]
        id_length = ID_LENGTH[first]
        if not id_length:
            raise InvalidEbml(f"invalid element ID first byte 0x{first:02X} at offset {pos}")
        p = pos + id_length
        size_length = VINT_LENGTH[buf[p]]
    except IndexError:
        raise NeedMoreData from None
    if not size_length:
        raise InvalidEbml(f"invalid size VINT (0x00) at offset {p}")
    q = p + size_length
    if q > len(buf):
        raise NeedMoreData
    mask = VINT_MASK[size_length]
    size = int.from_bytes(buf[p:q], "big") & mask
    eid = first if id_length == 1 else int.from_bytes(buf[pos:p], "big")
    return eid, (UNKNOWN_SIZE if size == mask else size), q - pos
