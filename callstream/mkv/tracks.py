"""Track and tag semantics: TrackEntry fields into `TrackInfo`, SimpleTags into (name, value).

`TrackCollector` and `TagCollector` take elements as the reader streams them;
`collect_tags` reads a wholly buffered Tags payload in one pass, with the
same result.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from callstream.mkv.ebml import (
    CODEC_ID,
    NAME,
    SIMPLE_TAG,
    TAG,
    TAG_NAME,
    TAG_STRING,
    TRACK_NUMBER,
    TRACK_UID,
)
from callstream.mkv.framing import Corrupt, child_header
from callstream.mkv.reports import TagsRead, TrackInfo, slot_setters

_SET_TAGS, _SET_TAGS_OFFSET = slot_setters(TagsRead)
_FLOAT_FORMATS = {0: None, 4: ">f", 8: ">d"}


def text(raw: bytes | bytearray | memoryview) -> str:
    """A Matroska string; KVS pads some with NULs, which are not part of the value."""
    return bytes(raw).rstrip(b"\x00").decode("utf-8", errors="replace")


def tags_read(pairs: tuple[tuple[str, str], ...], offset: int) -> TagsRead:
    """TagsRead(pairs, offset), made without the frozen __init__ (see `slot_setters`)."""
    event = object.__new__(TagsRead)
    _SET_TAGS(event, pairs)
    _SET_TAGS_OFFSET(event, offset)
    return event


@dataclass
class _TrackBuilder:
    number: int = 0
    uid: int = 0
    name: str | None = None
    codec_id: str | None = None
    track_type: int | None = None
    sampling_frequency: float | None = None
    channels: int | None = None


class TrackCollector:
    """The TrackEntries of one Tracks element, field by field as they are read."""

    def __init__(self) -> None:
        self._tracks: list[TrackInfo] = []
        self._track: _TrackBuilder | None = None

    def start_tracks(self) -> None:
        self._tracks = []

    def start_track(self) -> None:
        self._track = _TrackBuilder()

    def field(self, eid: int, raw: bytearray) -> None:
        """A TrackNumber, TrackUID, TrackType, Name or CodecID of the open TrackEntry."""
        t = self._track
        if t is None:
            return
        if eid == NAME:
            t.name = text(raw)
        elif eid == CODEC_ID:
            t.codec_id = text(raw)
        elif eid == TRACK_NUMBER:
            t.number = int.from_bytes(raw, "big")
        elif eid == TRACK_UID:
            t.uid = int.from_bytes(raw, "big")
        else:
            t.track_type = int.from_bytes(raw, "big")

    def sampling_frequency(self, start: int, raw: bytearray) -> None:
        """The Audio element's SamplingFrequency: a float of 0, 4 or 8 bytes."""
        if len(raw) not in _FLOAT_FORMATS:
            raise Corrupt(start, f"SamplingFrequency at offset {start} has {len(raw)} bytes")
        fmt = _FLOAT_FORMATS[len(raw)]
        if self._track is not None:
            value = struct.unpack(fmt, raw)[0] if fmt else 0.0
            self._track.sampling_frequency = float(value)

    def channels(self, raw: bytearray) -> None:
        if self._track is not None:
            self._track.channels = int.from_bytes(raw, "big")

    def end_track(self) -> None:
        t = self._track
        self._track = None
        if t is not None:
            self._tracks.append(
                TrackInfo(
                    t.number,
                    t.uid,
                    t.name,
                    t.codec_id,
                    t.track_type,
                    t.sampling_frequency,
                    t.channels,
                )
            )

    def tracks(self) -> tuple[TrackInfo, ...]:
        return tuple(self._tracks)


class TagCollector:
    """The SimpleTags of one Tags element, as they are read; parents before nested ones."""

    def __init__(self) -> None:
        self._pairs: list[list[str | None]] = []
        self._open: list[list[str | None]] = []

    def start_tags(self) -> None:
        self._pairs = []
        self._open = []

    def start_simple_tag(self) -> None:
        # A slot per SimpleTag at its start keeps parents before nested children.
        slot: list[str | None] = [None, ""]
        self._pairs.append(slot)
        self._open.append(slot)

    def tag_text(self, eid: int, raw: bytearray) -> None:
        """The open SimpleTag's TagName or TagString."""
        if self._open:
            self._open[-1][0 if eid == TAG_NAME else 1] = text(raw)

    def end_simple_tag(self) -> None:
        if self._open:
            self._open.pop()

    def end_tags(self) -> tuple[tuple[str, str], ...]:
        """Every named SimpleTag as (name, value); forgets them."""
        pairs = tuple((n, v or "") for n, v in self._pairs if n is not None)
        self._pairs = []
        return pairs


def collect_tags(
    view: bytes | memoryview, a: int, b: int, base: int
) -> tuple[tuple[str, str], ...]:
    """(name, value) of every SimpleTag in the Tags payload view[a:b], parents first.

    The same result as streaming through Tag/SimpleTag/TagName/TagString one
    element at a time, without the per-element dispatch.
    """
    out: list[tuple[str, str] | None] = []
    pos = a
    while pos < b:
        eid, size, header_len = child_header(view, pos, b, base)
        if eid == TAG:
            tag_pos, tag_end = pos + header_len, pos + header_len + size
            while tag_pos < tag_end:
                child, child_size, child_len = child_header(view, tag_pos, tag_end, base)
                body = tag_pos + child_len
                if child == SIMPLE_TAG:
                    _collect_simple_tag(view, body, body + child_size, base, out)
                tag_pos = body + child_size
        pos += header_len + size
    return tuple(pair for pair in out if pair is not None)


def _collect_simple_tag(
    view: bytes | memoryview, a: int, b: int, base: int, out: list[tuple[str, str] | None]
) -> None:
    index = len(out)
    out.append(None)  # keeps this tag before the nested ones it holds
    name: str | None = None
    value = ""
    pos = a
    while pos < b:
        eid, size, header_len = child_header(view, pos, b, base)
        body = pos + header_len
        if eid == TAG_NAME:
            name = text(view[body : body + size])
        elif eid == TAG_STRING:
            value = text(view[body : body + size])
        elif eid == SIMPLE_TAG:
            _collect_simple_tag(view, body, body + size, base, out)
        pos = body + size
    if name is not None:
        out[index] = (name, value)
