"""Matroska in Amazon Connect's exact layout, for producers, the emulator and tests.

The byte layout (element order, size-field widths, tag placement) copies a real
Connect GetMedia fragment dumped in `sample-matroska.txt`: one Tags element per
Connect tag, 8-byte size fields on those tags and on SimpleBlocks, 4-byte ones on
the AWS tags, and an unknown-size (0xFF) Cluster inside GetMedia output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE
from callstream.mkv.ebml import (
    CLUSTER,
    CODEC_ID,
    CODEC_PRIVATE,
    INFO,
    MUXING_APP,
    NAME,
    POSITION,
    SEGMENT,
    SEGMENT_UID,
    SIMPLE_BLOCK,
    SIMPLE_TAG,
    TAG,
    TAG_NAME,
    TAG_STRING,
    TAGS,
    TIMECODE,
    TIMECODE_SCALE,
    TITLE,
    TRACK_ENTRY,
    TRACK_NUMBER,
    TRACK_TYPE,
    TRACK_UID,
    TRACKS,
    WRITING_APP,
    ebml_header,
    element,
    encode_id,
    encode_size,
    uint_element,
)

AUDIO_TO_CUSTOMER = "AUDIO_TO_CUSTOMER"
AUDIO_FROM_CUSTOMER = "AUDIO_FROM_CUSTOMER"
KVS_APP = "Kinesis Video SDK 1.1.0 JNI 2.0"
KVS_TITLE = "Kinesis Video SDK"
# Connect labels the PCM tracks A_AAC; its 2-byte CodecPrivate is the AAC
# AudioSpecificConfig for LC, 8 kHz, mono (0b00010_1011_0001_000).
CODEC_PRIVATE_AAC_8K_MONO = b"\x15\x88"
TRACK_TYPE_AUDIO = 2
TIMECODE_SCALE_NS = 1_000_000
FIRST_FRAGMENT_NUMBER = 91343852333181551234925834077012571618243808844
SAMPLE_INSTANCE_ID = "3087be6e-771a-48a8-90da-93b5326a43a1"
SAMPLE_START_EPOCH_MS = 1782912654536
_KEYFRAME = 0x80
_MAX_RELATIVE_TIMECODE = 0x7FFF


@dataclass(frozen=True)
class ConnectTrackLayout:
    """Track number and TrackUID of each Connect track (default: as in the real sample).

    The AUDIO_TO_CUSTOMER / AUDIO_FROM_CUSTOMER tags carry the TrackUIDs.
    """

    to_customer_number: int = 1
    to_customer_uid: int = 2
    from_customer_number: int = 2
    from_customer_uid: int = 1

    def entries(self) -> list[tuple[int, int, str]]:
        """(number, uid, name) per track, in track-number order."""
        pairs = [
            (self.to_customer_number, self.to_customer_uid, AUDIO_TO_CUSTOMER),
            (self.from_customer_number, self.from_customer_uid, AUDIO_FROM_CUSTOMER),
        ]
        return sorted(pairs)


def pcm_to_blocks(pcm: bytes, block_samples: int = 512) -> list[bytes]:
    """Split 16-bit PCM into blocks of `block_samples` samples; the last may be shorter."""
    if len(pcm) % BYTES_PER_SAMPLE:
        raise ValueError(f"16-bit PCM must have an even length, got {len(pcm)} bytes")
    step = block_samples * BYTES_PER_SAMPLE
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def _long_element(element_id: int, payload: bytes) -> bytes:
    """An element with an 8-byte size field, as Connect writes tags and blocks."""
    return element(element_id, payload, 8)


def _str_bytes(value: str) -> bytes:
    return value.encode("utf-8")


def connect_tag(name: str, value: str) -> bytes:
    """One Connect Tags element (one Tag, one SimpleTag), every size field 8 bytes."""
    simple = _long_element(TAG_NAME, _str_bytes(name)) + _long_element(
        TAG_STRING, _str_bytes(value)
    )
    return element(TAGS, _long_element(TAG, _long_element(SIMPLE_TAG, simple)), 8)


def kvs_tags(pairs: list[tuple[str, str]]) -> bytes:
    """One Tags element as KVS writes its AWS_KINESISVIDEO_* tags (4-byte size fields)."""
    body = b"".join(
        element(
            SIMPLE_TAG,
            element(TAG_NAME, _str_bytes(n), 4) + element(TAG_STRING, _str_bytes(v), 4),
            4,
        )
        for n, v in pairs
    )
    return element(TAGS, element(TAG, body, 4), 4)


def format_kvs_timestamp(seconds: float) -> str:
    """A KVS timestamp tag value: epoch seconds with millisecond precision."""
    return f"{seconds:.3f}"


def block_header(track_number: int, relative_ms: int, flags: int = _KEYFRAME) -> bytes:
    """The 4-byte SimpleBlock header: track VINT, signed 16-bit relative timecode, flags."""
    if not 0 < track_number < 0x7F:
        raise ValueError(f"track number must be 1..126, got {track_number}")
    if not -0x8000 <= relative_ms <= _MAX_RELATIVE_TIMECODE:
        raise ValueError(f"relative timecode {relative_ms} ms does not fit 16 bits")
    return (
        bytes([0x80 | track_number]) + relative_ms.to_bytes(2, "big", signed=True) + bytes([flags])
    )


class ConnectCallWriter:
    """Writes one call's two PCM tracks as Amazon Connect does, fragment by fragment.

    `producer_header` + `producer_fragment`s form a PutMedia body;
    `getmedia_fragment` forms what GetMedia returns for the same audio. Both
    advance the same call clock: each fragment's Cluster Timecode is the
    start epoch plus the audio already written.
    """

    def __init__(
        self,
        contact_id: str,
        instance_id: str,
        start_epoch_ms: int,
        layout: ConnectTrackLayout | None = None,
        block_samples: int = 512,
        blocks_per_fragment: int = 16,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if block_samples <= 0 or blocks_per_fragment <= 0 or sample_rate <= 0:
            raise ValueError("block_samples, blocks_per_fragment and sample_rate must be > 0")
        self.contact_id = contact_id
        self.instance_id = instance_id
        self.start_epoch_ms = start_epoch_ms
        self.layout = layout or ConnectTrackLayout()
        self.block_samples = block_samples
        self.blocks_per_fragment = blocks_per_fragment
        self.sample_rate = sample_rate
        self.samples_written = 0

    @property
    def fragment_bytes(self) -> int:
        """PCM bytes per track in one full fragment."""
        return self.block_samples * self.blocks_per_fragment * BYTES_PER_SAMPLE

    @property
    def position_ms(self) -> int:
        """Epoch-ms timecode of the next fragment's Cluster."""
        return self.start_epoch_ms + self.samples_written * 1000 // self.sample_rate

    @property
    def mime_type(self) -> str:
        """The MimeType tag value Connect writes."""
        return f"audio/L16;rate={self.sample_rate};channels=1;"

    def segment_uid(self) -> bytes:
        """16 bytes derived from the contact id, so a rewrite gives the same bytes."""
        return hashlib.blake2b(self.contact_id.encode("utf-8"), digest_size=16).digest()

    def producer_header(self) -> bytes:
        """EBML header, unknown-size Segment, Info and Tracks: what PutMedia starts with."""
        return ebml_header() + encode_id(SEGMENT) + encode_size(-1) + self._info() + self._tracks()

    def producer_fragment(self, customer_pcm: bytes, agent_pcm: bytes) -> bytes:
        """Connect tags, one known-size Cluster holding both tracks, the tags again."""
        tags = self._connect_tags()
        cluster = element(CLUSTER, self._cluster_body(customer_pcm, agent_pcm), 8)
        return tags + cluster + tags

    def getmedia_fragment(
        self,
        customer_pcm: bytes,
        agent_pcm: bytes,
        *,
        fragment_number: str,
        server_ts: float,
        producer_ts: float,
        millis_behind_now: int,
        continuation_token: str,
        unknown_segment_size: bool = False,
    ) -> bytes:
        """One whole GetMedia fragment: EBML header and a Segment holding everything."""
        tags = self._connect_tags()
        before = kvs_tags(
            [
                ("AWS_KINESISVIDEO_FRAGMENT_NUMBER", fragment_number),
                ("AWS_KINESISVIDEO_SERVER_TIMESTAMP", format_kvs_timestamp(server_ts)),
                ("AWS_KINESISVIDEO_PRODUCER_TIMESTAMP", format_kvs_timestamp(producer_ts)),
            ]
        )
        # KVS passes the producer's unknown-size Cluster through: ID then 0xFF.
        cluster = encode_id(CLUSTER) + b"\xff" + self._cluster_body(customer_pcm, agent_pcm)
        after = kvs_tags(
            [
                ("AWS_KINESISVIDEO_MILLIS_BEHIND_NOW", str(millis_behind_now)),
                ("AWS_KINESISVIDEO_CONTINUATION_TOKEN", continuation_token),
            ]
        )
        body = self._info() + self._tracks() + tags + before + cluster + tags + after
        size = encode_size(-1) if unknown_segment_size else encode_size(len(body), 8)
        return ebml_header() + encode_id(SEGMENT) + size + body

    def _info(self) -> bytes:
        payload = (
            element(SEGMENT_UID, self.segment_uid())
            + uint_element(TIMECODE_SCALE, TIMECODE_SCALE_NS, 8)
            + element(TITLE, _str_bytes(KVS_TITLE))
            + element(MUXING_APP, _str_bytes(KVS_APP))
            + element(WRITING_APP, _str_bytes(KVS_APP))
        )
        return element(INFO, payload, 2)

    def _tracks(self) -> bytes:
        entries = b"".join(
            element(
                TRACK_ENTRY,
                uint_element(TRACK_NUMBER, number)
                + uint_element(TRACK_UID, uid, 8)
                + uint_element(TRACK_TYPE, TRACK_TYPE_AUDIO)
                + element(NAME, _str_bytes(name))
                + element(CODEC_ID, b"A_AAC")
                + element(CODEC_PRIVATE, CODEC_PRIVATE_AAC_8K_MONO),
                4,
            )
            for number, uid, name in self.layout.entries()
        )
        return element(TRACKS, entries, 4)

    def _connect_tags(self) -> bytes:
        return (
            connect_tag("ContactId", self.contact_id)
            + connect_tag("InstanceId", self.instance_id)
            + connect_tag("MimeType", self.mime_type)
            + connect_tag(AUDIO_TO_CUSTOMER, str(self.layout.to_customer_uid))
            + connect_tag(AUDIO_FROM_CUSTOMER, str(self.layout.from_customer_uid))
        )

    def _cluster_body(self, customer_pcm: bytes, agent_pcm: bytes) -> bytes:
        """Timecode, Position 0 and the time-ordered SimpleBlocks; advances the clock."""
        blocks: list[tuple[int, int, bytes]] = []
        for number, pcm in (
            (self.layout.from_customer_number, customer_pcm),
            (self.layout.to_customer_number, agent_pcm),
        ):
            for index, payload in enumerate(pcm_to_blocks(pcm, self.block_samples)):
                relative_ms = index * self.block_samples * 1000 // self.sample_rate
                blocks.append((relative_ms, number, payload))
        blocks.sort(key=lambda block: (block[0], block[1]))
        body = uint_element(TIMECODE, self.position_ms, 8) + uint_element(POSITION, 0)
        body += b"".join(
            _long_element(SIMPLE_BLOCK, block_header(number, rel) + payload)
            for rel, number, payload in blocks
        )
        self.samples_written += max(len(customer_pcm), len(agent_pcm)) // BYTES_PER_SAMPLE
        return body


def write_connect_call(
    customer_pcm: bytes,
    agent_pcm: bytes,
    contact_id: str,
    *,
    instance_id: str = SAMPLE_INSTANCE_ID,
    start_epoch_ms: int = SAMPLE_START_EPOCH_MS,
    layout: ConnectTrackLayout | None = None,
    block_samples: int = 512,
    blocks_per_fragment: int = 16,
    first_fragment_number: int = FIRST_FRAGMENT_NUMBER,
    unknown_segment_size: bool = False,
) -> bytes:
    """A whole call as concatenated GetMedia fragments (~1 s each), as GetMedia returns it.

    Fragment numbers count up from `first_fragment_number`; the producer
    timestamp is the Cluster time, the server one 170 ms later, and
    MILLIS_BEHIND_NOW is the audio from the fragment start to the call end.
    """
    writer = ConnectCallWriter(
        contact_id, instance_id, start_epoch_ms, layout, block_samples, blocks_per_fragment
    )
    step = writer.fragment_bytes
    total = max(len(customer_pcm), len(agent_pcm))
    end_ms = start_epoch_ms + total // BYTES_PER_SAMPLE * 1000 // writer.sample_rate
    parts: list[bytes] = []
    for index, offset in enumerate(range(0, total, step)):
        producer_s = writer.position_ms / 1000
        number = str(first_fragment_number + index)
        fragment = writer.getmedia_fragment(
            customer_pcm[offset : offset + step],
            agent_pcm[offset : offset + step],
            fragment_number=number,
            server_ts=producer_s + 0.170,
            producer_ts=producer_s,
            millis_behind_now=end_ms - writer.position_ms,
            continuation_token=number,
            unknown_segment_size=unknown_segment_size,
        )
        parts.append(fragment)
    return b"".join(parts)
