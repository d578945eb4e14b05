"""Push parser for Matroska as Kinesis Video Streams delivers it: bytes in, events out.

`MkvStreamReader.feed` takes whatever chunk the network gave and returns the
events it completed; chunk boundaries never change the events. A frame is
reported as soon as its block is complete, never at the end of its Cluster.
Memory stays bounded: only the element being read is buffered, and elements the
reader does not need (Cues, SeekHead, Void, CodecPrivate, ...) are skipped as
their bytes arrive. On corrupt input the reader reports a `StreamError` and
resynchronises at the next EBML header it can verify.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, NamedTuple

from callstream.mkv.ebml import (
    AUDIO,
    BLOCK,
    BLOCK_GROUP,
    CHANNELS,
    CLUSTER,
    CLUSTER_CHILDREN,
    CODEC_ID,
    CRC32,
    EBML,
    EBML_VERSION,
    ID_LENGTH,
    INFO,
    NAME,
    REFERENCE_BLOCK,
    SAMPLING_FREQUENCY,
    SEGMENT,
    SEGMENT_CHILDREN,
    SIMPLE_BLOCK,
    SIMPLE_TAG,
    TAG,
    TAG_NAME,
    TAG_STRING,
    TAGS,
    TIMECODE,
    TIMECODE_SCALE,
    TOP_LEVEL,
    TRACK_ENTRY,
    TRACK_NUMBER,
    TRACK_TYPE,
    TRACK_UID,
    TRACKS,
    UNKNOWN_SIZE,
    VINT_LENGTH,
    VINT_MASK,
    VOID,
    InvalidEbml,
    NeedMoreData,
    element_name,
    read_element_header,
    read_id,
    read_size,
)
from callstream.mkv.events import (
    ClusterEnded,
    ClusterStarted,
    FrameRead,
    MkvEvent,
    SegmentStarted,
    StreamError,
    TagsRead,
    TrackInfo,
    TracksRead,
)

DEFAULT_TIMECODE_SCALE_NS = 1_000_000
DEFAULT_MAX_ELEMENT_SIZE = 64 * 1024 * 1024
EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_NO_END = -1
# Where each element may appear; other IDs there mean corruption. Unknown-size
# elements give no other way to notice it.
_ALLOWED_CHILDREN: dict[int | None, frozenset[int]] = {
    None: TOP_LEVEL | {VOID, CRC32},
    SEGMENT: SEGMENT_CHILDREN,
    CLUSTER: CLUSTER_CHILDREN,
}
# IDs that close an open unknown-size element because they belong to a parent level.
_CLOSES_UNKNOWN: dict[int, frozenset[int]] = {
    CLUSTER: SEGMENT_CHILDREN | TOP_LEVEL,
    SEGMENT: TOP_LEVEL,
}
# Small masters are walked once wholly buffered, which is faster than streaming
# them element by element; larger ones (Tracks with big CodecPrivate) stream.
_BATCHED = frozenset({INFO, TRACKS, TAGS})
_BATCH_LIMIT = 64 * 1024
_CACHE_MAX_BYTES = 4096
_CACHE_ENTRIES = 512
_LACING_MASK = 0x06
_XIPH_LACING = 0x02
_FIXED_LACING = 0x04  # and 0x06: EBML lacing


class _Corrupt(Exception):
    """Raised inside the reader when the bytes at `offset` cannot be what they claim."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


class _Open(NamedTuple):
    """A master element being read: ID, absolute end (or _NO_END), start, parent limit."""

    element_id: int
    end: int
    start: int
    limit: int


@dataclass
class _TrackBuilder:
    number: int = 0
    uid: int = 0
    name: str | None = None
    codec_id: str | None = None
    track_type: int | None = None
    sampling_frequency: float | None = None
    channels: int | None = None


def _slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen slots dataclass, in field order.

    Filling the slots directly makes the same object as cls(...), whose frozen
    __init__ goes through object.__setattr__ per field: for the events made per
    block or per tag, that costs more than the decoding itself.
    """
    return tuple(getattr(cls, f.name).__set__ for f in fields(cls))


_FRAME_SETTERS = _slot_setters(FrameRead)
_SET_TAGS, _SET_TAGS_OFFSET = _slot_setters(TagsRead)
# A SimpleBlock's element header and block header, as KVS writes them: ID A3,
# 8-byte size, 1-byte track number, signed 16-bit timecode, flags.
_KVS_BLOCK = struct.Struct(">BQBhB").unpack_from
_SHORT_BLOCK = struct.Struct(">BBBhB").unpack_from
_MEDIUM_BLOCK = struct.Struct(">BHBhB").unpack_from
_BLOCK_HEAD_MAX = 13
_SIZE_8 = (1 << 56) - 1


def _other_block_head(buf: bytearray, pos: int) -> tuple[int, int, int, int, int] | None:
    """(size, body index, track byte, timecode, flags) for a 1- or 2-byte size; else None."""
    first = buf[pos + 1]
    if 0x80 <= first < 0xFF:
        _, size, track, relative, flags = _SHORT_BLOCK(buf, pos)
        return size & 0x7F, pos + 2, track, relative, flags
    if 0x40 <= first < 0x80:
        _, size, track, relative, flags = _MEDIUM_BLOCK(buf, pos)
        size &= 0x3FFF
        return None if size == 0x3FFF else (size, pos + 3, track, relative, flags)
    return None


def _frame_factory() -> Callable[[int, str | None, int, bool, bytes], FrameRead]:
    """A FrameRead constructor that fills the slots directly (see _FRAME_SETTERS)."""
    new = object.__new__
    set_track, set_name, set_time, set_key, set_data = _FRAME_SETTERS

    def make(track: int, name: str | None, timecode_ms: int, key: bool, data: bytes) -> FrameRead:
        frame = new(FrameRead)
        set_track(frame, track)
        set_name(frame, name)
        set_time(frame, timecode_ms)
        set_key(frame, key)
        set_data(frame, data)
        return frame

    return make


_new_frame = _frame_factory()


def _text(raw: bytes | bytearray | memoryview) -> str:
    """A Matroska string; KVS pads some with NULs, which are not part of the value."""
    return bytes(raw).rstrip(b"\x00").decode("utf-8", errors="replace")


def _verified_header_at(buf: bytearray, index: int) -> bool | None:
    """Whether a strict EBML header starts at `index` (None: need more bytes to tell).

    The magic alone is not enough: PCM can contain 1A 45 DF A3. A real header
    has a known size and starts with an EBMLVersion element of 1..8 bytes.
    """
    try:
        size, size_len = read_size(buf, index + 4)
        if size == UNKNOWN_SIZE:
            return False
        child_at = index + 4 + size_len
        child, child_len = read_id(buf, child_at)
        if child != EBML_VERSION:
            return False
        child_size, _ = read_size(buf, child_at + child_len)
    except NeedMoreData:
        return None
    except InvalidEbml:
        return False
    return 0 < child_size <= 8 and child_size < size


def _child_header(view: bytes | memoryview, pos: int, b: int, base: int) -> tuple[int, int, int]:
    """Header of the child at `pos` of a wholly buffered master ending at `b`.

    `view` ends where the buffered element ends, so a header cut by that end is
    reported the same way whatever was fed after it. Decoded inline (same rules
    as `read_element_header`): tags are the most numerous elements after blocks.
    """
    try:
        first = view[pos]
        id_length = ID_LENGTH[first]
        p = pos + id_length
        size_length = VINT_LENGTH[view[p]]
    except IndexError:
        start = base + pos
        raise _Corrupt(start, f"element header at offset {start} overruns its parent") from None
    q = p + size_length
    if not id_length or not size_length or q > len(view):
        start = base + pos
        if id_length and size_length:
            raise _Corrupt(start, f"element header at offset {start} overruns its parent")
        raise _Corrupt(start, f"invalid element header at offset {start}")
    mask = VINT_MASK[size_length]
    size = int.from_bytes(view[p:q], "big") & mask
    eid = first if id_length == 1 else int.from_bytes(view[pos:p], "big")
    if size == mask or q + size > b:
        start = base + pos
        raise _Corrupt(start, f"{element_name(eid)} at offset {start} overruns its parent")
    return eid, size, q - pos


def _collect_tags(
    view: bytes | memoryview, a: int, b: int, base: int
) -> tuple[tuple[str, str], ...]:
    """(name, value) of every SimpleTag in the Tags payload view[a:b], parents first.

    The same result as streaming through Tag/SimpleTag/TagName/TagString one
    element at a time, without the per-element dispatch.
    """
    out: list[tuple[str, str] | None] = []
    pos = a
    while pos < b:
        eid, size, header_len = _child_header(view, pos, b, base)
        if eid == TAG:
            tag_pos, tag_end = pos + header_len, pos + header_len + size
            while tag_pos < tag_end:
                child, child_size, child_len = _child_header(view, tag_pos, tag_end, base)
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
        eid, size, header_len = _child_header(view, pos, b, base)
        body = pos + header_len
        if eid == TAG_NAME:
            name = _text(view[body : body + size])
        elif eid == TAG_STRING:
            value = _text(view[body : body + size])
        elif eid == SIMPLE_TAG:
            _collect_simple_tag(view, body, body + size, base, out)
        pos = body + size
    if name is not None:
        out[index] = (name, value)


class MkvStreamReader:
    """Incremental Matroska/KVS reader: `feed` chunks, take the events, `close` at the end.

    Pure and single-threaded: no I/O, no clocks. Offsets in events are absolute
    positions in the concatenation of everything fed.
    """

    def __init__(self, max_element_size: int = DEFAULT_MAX_ELEMENT_SIZE) -> None:
        self._max_element_size = max_element_size
        self._buf = bytearray()
        self._pos = 0  # index in _buf of the next unread byte
        self._base = 0  # absolute offset of _buf[0]
        self._skip = 0  # bytes of a skipped element still to discard
        self._skip_id = 0
        self._skip_start = 0
        self._stack: list[_Open] = []
        self._events: list[MkvEvent] = []
        self._resyncing = False
        self._closed = False
        self._scale = DEFAULT_TIMECODE_SCALE_NS
        self._track_names: dict[int, str | None] = {}
        self._header_offset: int | None = None
        self._cluster_start = 0
        self._cluster_tc: int | None = None
        self._group_referenced = False
        self._tracks: list[TrackInfo] = []
        self._track: _TrackBuilder | None = None
        self._tag_pairs: list[list[str | None]] = []
        self._tag_open: list[list[str | None]] = []
        # What the last Info/Tracks/Tags did, to repeat for identical bytes.
        self._replay: Callable[[int], None] | None = None
        self._replays: dict[bytes, Callable[[int], None]] = {}
        # Which cached element followed which, and the last one replayed.
        self._successors: dict[bytes, bytes] = {}
        self._last_raw: bytes | None = None
        self._last_end = _NO_END
        self._build_tables()

    def feed(self, data: bytes | bytearray | memoryview) -> list[MkvEvent]:
        """Add the next bytes of the stream; return the events they completed."""
        if self._closed:
            raise ValueError("MkvStreamReader.feed() called after close()")
        if not self._buf and self._skip > len(data):
            # Wholly inside an element being skipped: no need to buffer it.
            self._skip -= len(data)
            self._base += len(data)
            return []
        self._buf += data
        self._parse()
        self._compact()
        return self._take_events()

    def close(self) -> list[MkvEvent]:
        """End of input: report an element cut off mid-way, end open unknown-size elements."""
        if self._closed:
            return []
        self._closed = True
        if not self._resyncing:
            cut = self._truncation()
            if cut is not None:
                self._events.append(cut)
            else:
                here = self._base + self._pos
                while self._stack:
                    self._pop(here)
        self._buf.clear()
        return self._take_events()

    # -- the parse loop ---------------------------------------------------------

    def _parse(self) -> None:
        while True:
            if self._resyncing and not self._resync():
                return
            if self._skip and not self._consume_skip():
                return
            try:
                if not self._run():
                    return
            except _Corrupt as exc:
                self._fail(exc.offset, exc.reason)

    def _run(self) -> bool:
        """Read elements while the buffer holds them; False when more bytes are needed.

        Runs of plain SimpleBlocks, nearly all of a stream, go through `_scan_blocks`.
        """
        buf, stack, base = self._buf, self._stack, self._base
        while True:
            pos = self._pos
            here = base + pos
            while stack and stack[-1].limit == here:
                self._pop(here)
            if stack and stack[-1].element_id == CLUSTER and pos < len(buf) and buf[pos] == 0xA3:
                self._scan_blocks(stack[-1])
                if self._pos != pos:
                    continue
            try:
                eid, size, header_len = read_element_header(buf, pos)
            except NeedMoreData:
                return False
            except InvalidEbml:
                raise _Corrupt(here, f"invalid element ID or size at offset {here}") from None
            if eid in _BATCHED and self._replay_known(eid, size, header_len):
                continue
            if not self._dispatch(eid, size, header_len, here):
                return False
            if self._skip:
                return True

    def _scan_blocks(self, cluster: _Open) -> None:
        """Emit a run of complete, unlaced SimpleBlocks with one-byte track numbers.

        The short path for nearly every byte of a KVS stream. It stops at anything
        else (laced, odd-sized, incomplete, or past the Cluster's end), which the
        general path then reads or reports; both give the same events.
        """
        tc = self._cluster_tc
        if tc is None:
            return
        buf, base, pos, n = self._buf, self._base, self._pos, len(self._buf)
        bound = n if cluster.limit == _NO_END else min(n, cluster.limit - base)
        stop, max_size, scale = n - _BLOCK_HEAD_MAX, self._max_element_size, self._scale
        names, append, new = self._track_names, self._events.append, object.__new__
        set_track, set_name, set_time, set_key, set_data = _FRAME_SETTERS
        while pos <= stop and pos < bound and buf[pos] == 0xA3:
            if buf[pos + 1] == 0x01:  # the 8-byte size KVS writes
                _, size, track, relative, flags = _KVS_BLOCK(buf, pos)
                size &= _SIZE_8
                body = pos + 9
            else:
                head = _other_block_head(buf, pos)
                if head is None:
                    break
                size, body, track, relative, flags = head
            end = body + size
            if end > bound or not 4 <= size <= max_size or not track & 0x80 or flags & _LACING_MASK:
                break
            track &= 0x7F
            frame = new(FrameRead)
            set_track(frame, track)
            set_name(frame, names.get(track))
            set_time(
                frame, tc + relative if scale == 1_000_000 else (tc + relative) * scale // 1_000_000
            )
            set_key(frame, flags & 0x80 != 0)
            set_data(frame, bytes(buf[body + 4 : end]))
            append(frame)
            pos = end
        self._pos = pos

    def _replay_known(self, eid: int, size: int, header_len: int) -> bool:
        """Repeat a Segment-level Info/Tracks/Tags seen before, byte for byte.

        The same outcome as `_dispatch` then `_read_batched` would reach, without
        their checks: those bytes passed them already, in the same place.
        """
        stack, pos = self._stack, self._pos
        top = stack[-1] if stack else None
        end = pos + header_len + size
        if (
            top is None
            or top.element_id != SEGMENT
            or not 0 <= size <= _CACHE_MAX_BYTES
            or end > len(self._buf)
            or _NO_END != top.limit < self._base + end
        ):
            return False
        raw = bytes(self._buf[pos:end])
        replay = self._replays.get(raw)
        if replay is None:
            return False
        self._learn(raw, self._base + pos)
        replay(self._base + pos)
        self._pos = end
        self._follow_chain(raw, top)
        return True

    def _learn(self, raw: bytes, start: int) -> None:
        """Note that the cached element `raw` at `start` came right after the last one."""
        if self._last_end == start and self._last_raw is not None:
            self._successors[self._last_raw] = raw
        self._last_raw, self._last_end = raw, start + len(raw)

    def _follow_chain(self, raw: bytes, segment: _Open) -> None:
        """Replay the cached elements that followed `raw` last time, while the bytes match.

        KVS writes the same run of Tags (ContactId, InstanceId, MimeType, the
        track tags) in every fragment; one byte comparison per element replaces
        reading its header and hashing it.
        """
        buf, base, pos = self._buf, self._base, self._pos
        successors, replays, limit = self._successors, self._replays, segment.limit
        while True:
            following = successors.get(raw)
            if following is None or not buf.startswith(following, pos):
                break
            end = pos + len(following)
            replay = replays.get(following)
            if replay is None or _NO_END != limit < base + end:
                break
            replay(base + pos)
            raw, pos = following, end
        self._pos = pos
        self._last_raw, self._last_end = raw, base + pos

    def _dispatch(self, eid: int, size: int, header_len: int, start: int) -> bool:
        """Act on the element whose header was just read; False when more bytes are needed."""
        parent = self._place(eid, start)
        key = (parent.element_id if parent else None, eid)
        end = _NO_END if size == UNKNOWN_SIZE else start + header_len + size
        if end == _NO_END or (parent is not None and _NO_END != parent.limit < end):
            self._check_size(eid, start, size, end, parent)
        body = self._pos + header_len
        if key in self._masters:
            if end != _NO_END and eid in _BATCHED and size <= _BATCH_LIMIT:
                return self._read_batched(key, start, body, end)
            self._open(key, start, end, parent)
            self._pos = body
            return True
        leaf = self._leaves.get(key)
        if leaf is None:
            if len(self._buf) - body >= size:  # already here: no need to track a skip
                self._pos = body + size
            else:
                self._skip_id, self._skip_start, self._skip = eid, start, size
                self._pos = body
            return True
        if size > self._max_element_size:
            raise _Corrupt(start, f"{element_name(eid)} at offset {start} claims {size} bytes")
        if len(self._buf) - body < size:
            return False
        leaf(eid, start, body, body + size)
        self._pos = body + size
        return True

    def _place(self, eid: int, start: int) -> _Open | None:
        """End unknown-size elements that `eid` closes; check `eid` may appear here."""
        stack = self._stack
        while stack and stack[-1].end == _NO_END:
            closers = _CLOSES_UNKNOWN.get(stack[-1].element_id)
            if closers is None or eid not in closers:
                break
            self._pop(start)
        parent = stack[-1] if stack else None
        parent_id = parent.element_id if parent else None
        allowed = _ALLOWED_CHILDREN.get(parent_id)
        if allowed is not None and eid not in allowed:
            where = element_name(parent_id) if parent_id is not None else "the top level"
            raise _Corrupt(start, f"{element_name(eid)} at offset {start} cannot be in {where}")
        return parent

    def _check_size(self, eid: int, start: int, size: int, end: int, parent: _Open | None) -> None:
        if end == _NO_END:
            if eid not in _CLOSES_UNKNOWN:
                raise _Corrupt(start, f"{element_name(eid)} at offset {start} has an unknown size")
            return
        limit = parent.limit if parent else _NO_END
        if limit != _NO_END and end > limit:
            raise _Corrupt(
                start,
                f"{element_name(eid)} at offset {start} ({size} bytes) "
                f"overruns its parent's end {limit}",
            )

    def _open(
        self, key: tuple[int | None, int], start: int, end: int, parent: _Open | None
    ) -> None:
        inherited = parent.limit if parent else _NO_END
        self._stack.append(_Open(key[1], end, start, inherited if end == _NO_END else end))
        starter = self._masters[key]
        if starter is not None:
            starter(start)

    def _pop(self, here: int) -> None:
        opened = self._stack.pop()
        ender = self._ends.get(opened.element_id)
        if ender is not None:
            self._replay = None
            ender(opened, here)
            if self._replay is not None:
                self._replay(opened.start)

    def _read_batched(self, key: tuple[int | None, int], start: int, body: int, end: int) -> bool:
        """A small Info, Tracks or Tags: wait for all of it, then walk it or replay it.

        KVS repeats the same Tags (ContactId, MimeType, ...) and Tracks in every
        fragment; their effect is a function of their bytes, so it is cached.
        """
        b = end - self._base
        if len(self._buf) < b:
            return False
        raw = bytes(self._buf[start - self._base : b]) if end - start <= _CACHE_MAX_BYTES else b""
        replay = self._replays.get(raw) if raw else None
        if replay is None:
            self._replay = None
            # The view ends with the element, so nothing past it is ever read.
            if key[1] == TAGS and raw:
                pairs = _collect_tags(raw, body - (start - self._base), len(raw), start)
                self._replay = partial(self._apply_tags, pairs)
            else:
                with memoryview(self._buf) as whole, whole[:b] as view:
                    if key[1] == TAGS:
                        pairs = _collect_tags(view, body, b, self._base)
                        self._replay = partial(self._apply_tags, pairs)
                    else:
                        self._walk_master(key, start, body, b, view)
            replay = self._replay
            if raw and replay is not None:
                if len(self._replays) >= _CACHE_ENTRIES:
                    self._replays.clear()
                    self._successors.clear()
                self._replays[raw] = replay
        if replay is not None:
            if raw:
                self._learn(raw, start)
            replay(start)
        self._pos = b
        return True

    def _walk_master(
        self, key: tuple[int | None, int], start: int, a: int, b: int, view: memoryview
    ) -> None:
        """Handle a master whose bytes buf[a:b] are all buffered, with its start and end."""
        opened = _Open(key[1], self._base + b, start, self._base + b)
        starter = self._masters[key]
        if starter is not None:
            starter(start)
        self._walk(key[1], a, b, view)
        ender = self._ends.get(key[1])
        if ender is not None:
            ender(opened, opened.end)

    def _walk(self, parent_id: int, a: int, b: int, view: memoryview) -> None:
        base, masters, leaves = self._base, self._masters, self._leaves
        pos = a
        while pos < b:
            eid, size, header_len = _child_header(view, pos, b, base)
            body = pos + header_len
            end = body + size
            key = (parent_id, eid)
            if key in masters:
                self._walk_master(key, base + pos, body, end, view)
            else:
                leaf = leaves.get(key)
                if leaf is not None:
                    leaf(eid, base + pos, body, end)
            pos = end

    def _consume_skip(self) -> bool:
        available = len(self._buf) - self._pos
        if available >= self._skip:
            self._pos += self._skip
            self._skip = 0
            return True
        self._pos = len(self._buf)
        self._skip -= available
        return False

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._base += self._pos
            self._pos = 0

    def _take_events(self) -> list[MkvEvent]:
        events, self._events = self._events, []
        return events

    # -- errors and resynchronisation ------------------------------------------

    def _fail(self, offset: int, reason: str) -> None:
        self._events.append(StreamError(offset, reason))
        self._stack.clear()
        self._skip = 0
        self._resyncing = True
        self._pos = offset - self._base

    def _resync(self) -> bool:
        """Move to the next verified EBML header; False if the buffer holds none yet."""
        buf = self._buf
        while True:
            index = buf.find(EBML_MAGIC, self._pos)
            if index < 0:
                self._pos = max(self._pos, len(buf) - len(EBML_MAGIC) + 1)
                return False
            verdict = _verified_header_at(buf, index)
            if verdict is None:
                self._pos = index
                return False
            if verdict:
                self._pos = index
                self._resyncing = False
                return True
            self._pos = index + 1

    def _truncation(self) -> StreamError | None:
        """At end of input: the element cut off mid-way, if any."""
        here = self._base + self._pos
        if self._skip:
            name, start = element_name(self._skip_id), self._skip_start
            return StreamError(
                start, f"input ended inside {name} at offset {start}: {self._skip} bytes missing"
            )
        if self._pos < len(self._buf):
            return self._cut_element(here)
        for opened in reversed(self._stack):
            if opened.end != _NO_END:
                name, start = element_name(opened.element_id), opened.start
                missing = opened.end - here
                return StreamError(
                    start, f"input ended inside {name} at offset {start}: {missing} bytes missing"
                )
        return None

    def _cut_element(self, here: int) -> StreamError:
        buf, pos = self._buf, self._pos
        try:
            eid, id_len = read_id(buf, pos)
            size, size_len = read_size(buf, pos + id_len)
        except (NeedMoreData, InvalidEbml):
            have = len(buf) - pos
            return StreamError(
                here, f"input ended inside an element header at offset {here} ({have} bytes)"
            )
        missing = size - (len(buf) - pos - id_len - size_len)
        return StreamError(
            here,
            f"input ended inside {element_name(eid)} at offset {here}: "
            f"{missing} of its {size} bytes missing",
        )

    # -- what each element means -------------------------------------------------

    def _build_tables(self) -> None:
        """(parent ID, element ID) -> handler; elements not listed are skipped by size."""
        self._masters: dict[tuple[int | None, int], Callable[[int], None] | None] = {
            (None, SEGMENT): self._start_segment,
            (SEGMENT, INFO): self._start_info,
            (SEGMENT, TRACKS): self._start_tracks,
            (TRACKS, TRACK_ENTRY): self._start_track,
            (TRACK_ENTRY, AUDIO): None,
            (SEGMENT, TAGS): self._start_tags,
            (TAGS, TAG): None,
            (TAG, SIMPLE_TAG): self._start_simple_tag,
            (SIMPLE_TAG, SIMPLE_TAG): self._start_simple_tag,
            (SEGMENT, CLUSTER): self._start_cluster,
            (CLUSTER, BLOCK_GROUP): self._start_block_group,
        }
        self._ends: dict[int, Callable[[_Open, int], None]] = {
            INFO: self._end_info,
            TRACKS: self._end_tracks,
            TRACK_ENTRY: self._end_track,
            TAGS: self._end_tags,
            SIMPLE_TAG: self._end_simple_tag,
            CLUSTER: self._end_cluster,
        }
        self._leaves: dict[tuple[int | None, int], Callable[[int, int, int, int], None]] = {
            (None, EBML): self._on_ebml_header,
            (INFO, TIMECODE_SCALE): self._on_timecode_scale,
            (TRACK_ENTRY, TRACK_NUMBER): self._on_track_field,
            (TRACK_ENTRY, TRACK_UID): self._on_track_field,
            (TRACK_ENTRY, TRACK_TYPE): self._on_track_field,
            (TRACK_ENTRY, NAME): self._on_track_field,
            (TRACK_ENTRY, CODEC_ID): self._on_track_field,
            (AUDIO, SAMPLING_FREQUENCY): self._on_sampling_frequency,
            (AUDIO, CHANNELS): self._on_channels,
            (SIMPLE_TAG, TAG_NAME): self._on_tag_text,
            (SIMPLE_TAG, TAG_STRING): self._on_tag_text,
            (CLUSTER, TIMECODE): self._on_cluster_timecode,
            (CLUSTER, SIMPLE_BLOCK): self._on_block,
            (BLOCK_GROUP, BLOCK): self._on_block,
            (BLOCK_GROUP, REFERENCE_BLOCK): self._on_reference_block,
        }

    def _uint(self, a: int, b: int) -> int:
        return int.from_bytes(self._buf[a:b], "big")

    def _on_ebml_header(self, eid: int, start: int, a: int, b: int) -> None:
        # Nothing in it changes how the Segment reads; only where the fragment starts.
        self._header_offset = start

    def _start_segment(self, start: int) -> None:
        offset = start if self._header_offset is None else self._header_offset
        self._header_offset = None
        self._scale = DEFAULT_TIMECODE_SCALE_NS
        self._track_names = {}
        self._cluster_tc = None
        self._events.append(SegmentStarted(offset))

    def _start_tracks(self, start: int) -> None:
        self._tracks = []

    def _start_track(self, start: int) -> None:
        self._track = _TrackBuilder()

    def _end_track(self, opened: _Open, here: int) -> None:
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

    def _end_tracks(self, opened: _Open, here: int) -> None:
        self._replay = partial(self._apply_tracks, tuple(self._tracks))

    def _apply_tracks(self, tracks: tuple[TrackInfo, ...], start: int) -> None:
        self._track_names = {t.number: t.name for t in tracks}
        self._events.append(TracksRead(tracks))

    def _start_info(self, start: int) -> None:
        self._scale = DEFAULT_TIMECODE_SCALE_NS

    def _end_info(self, opened: _Open, here: int) -> None:
        self._replay = partial(self._apply_info, self._scale)

    def _apply_info(self, scale: int, start: int) -> None:
        self._scale = scale

    def _on_track_field(self, eid: int, start: int, a: int, b: int) -> None:
        t = self._track
        if t is None:
            return
        if eid == NAME:
            t.name = _text(self._buf[a:b])
        elif eid == CODEC_ID:
            t.codec_id = _text(self._buf[a:b])
        elif eid == TRACK_NUMBER:
            t.number = self._uint(a, b)
        elif eid == TRACK_UID:
            t.uid = self._uint(a, b)
        else:
            t.track_type = self._uint(a, b)

    def _on_sampling_frequency(self, eid: int, start: int, a: int, b: int) -> None:
        formats = {0: None, 4: ">f", 8: ">d"}
        if b - a not in formats:
            raise _Corrupt(start, f"SamplingFrequency at offset {start} has {b - a} bytes")
        fmt = formats[b - a]
        if self._track is not None:
            value = struct.unpack(fmt, self._buf[a:b])[0] if fmt else 0.0
            self._track.sampling_frequency = float(value)

    def _on_channels(self, eid: int, start: int, a: int, b: int) -> None:
        if self._track is not None:
            self._track.channels = self._uint(a, b)

    def _on_timecode_scale(self, eid: int, start: int, a: int, b: int) -> None:
        self._scale = self._uint(a, b) or DEFAULT_TIMECODE_SCALE_NS

    def _start_tags(self, start: int) -> None:
        self._tag_pairs = []
        self._tag_open = []

    def _start_simple_tag(self, start: int) -> None:
        # A slot per SimpleTag at its start keeps parents before nested children.
        slot: list[str | None] = [None, ""]
        self._tag_pairs.append(slot)
        self._tag_open.append(slot)

    def _on_tag_text(self, eid: int, start: int, a: int, b: int) -> None:
        if self._tag_open:
            self._tag_open[-1][0 if eid == TAG_NAME else 1] = _text(self._buf[a:b])

    def _end_simple_tag(self, opened: _Open, here: int) -> None:
        if self._tag_open:
            self._tag_open.pop()

    def _end_tags(self, opened: _Open, here: int) -> None:
        pairs = tuple((n, v or "") for n, v in self._tag_pairs if n is not None)
        self._tag_pairs = []
        self._replay = partial(self._apply_tags, pairs)

    def _apply_tags(self, pairs: tuple[tuple[str, str], ...], start: int) -> None:
        event = object.__new__(TagsRead)
        _SET_TAGS(event, pairs)
        _SET_TAGS_OFFSET(event, start)
        self._events.append(event)

    def _start_cluster(self, start: int) -> None:
        self._cluster_start = start
        self._cluster_tc = None

    def _on_cluster_timecode(self, eid: int, start: int, a: int, b: int) -> None:
        self._cluster_tc = self._uint(a, b)
        timecode_ms = self._cluster_tc * self._scale // 1_000_000
        self._events.append(ClusterStarted(timecode_ms, self._cluster_start))

    def _end_cluster(self, opened: _Open, here: int) -> None:
        self._cluster_tc = None
        self._events.append(ClusterEnded(here))

    def _start_block_group(self, start: int) -> None:
        self._group_referenced = False

    def _on_reference_block(self, eid: int, start: int, a: int, b: int) -> None:
        self._group_referenced = True

    # -- blocks --------------------------------------------------------------------

    def _on_block(self, eid: int, start: int, a: int, b: int) -> None:
        """A SimpleBlock or a BlockGroup's Block, complete in the buffer: emit its frames."""
        buf = self._buf
        first = buf[a]
        if first & 0x80:
            track, p = first & 0x7F, a + 1
        else:
            track, p = self._long_track_number(start, a)
        if p + 3 > b:
            raise _Corrupt(start, f"block at offset {start} is shorter than its header")
        cluster_tc = self._cluster_tc
        if cluster_tc is None:
            raise _Corrupt(start, f"block at offset {start} comes before its Cluster's Timecode")
        relative = (buf[p] << 8) | buf[p + 1]
        if relative & 0x8000:
            relative -= 0x10000
        flags = buf[p + 2]
        # A Block has no keyframe flag; a ReferenceBlock before it says it is not one.
        keyframe = bool(flags & 0x80) if eid == SIMPLE_BLOCK else not self._group_referenced
        timecode_ms = (cluster_tc + relative) * self._scale // 1_000_000
        name = self._track_names.get(track)
        lacing = flags & _LACING_MASK
        if not lacing:
            self._events.append(
                _new_frame(track, name, timecode_ms, keyframe, bytes(buf[p + 3 : b]))
            )
            return
        for x, y in self._lace_ranges(start, lacing, p + 3, b):
            self._events.append(_new_frame(track, name, timecode_ms, keyframe, bytes(buf[x:y])))

    def _long_track_number(self, start: int, a: int) -> tuple[int, int]:
        try:
            track, length = read_size(self._buf, a)
        except (NeedMoreData, InvalidEbml):
            raise _Corrupt(start, f"invalid track number in block at offset {start}") from None
        return track, a + length

    def _lace_ranges(self, start: int, lacing: int, p: int, end: int) -> list[tuple[int, int]]:
        """Buffer ranges of the frames of a laced block (Xiph, EBML or fixed lacing)."""
        if p >= end:
            raise _Corrupt(start, f"laced block at offset {start} has no frame count")
        count = self._buf[p] + 1
        p += 1
        try:
            if lacing == _FIXED_LACING:
                if (end - p) % count:
                    raise _Corrupt(start, f"fixed-laced block at offset {start} does not divide")
                sizes = [(end - p) // count] * (count - 1)
            elif lacing == _XIPH_LACING:
                sizes, p = self._xiph_sizes(p, end, count)
            else:
                sizes, p = self._ebml_lace_sizes(p, end, count)
        except (NeedMoreData, InvalidEbml):
            raise _Corrupt(start, f"invalid lace sizes in block at offset {start}") from None
        sizes.append(end - p - sum(sizes))
        if p > end or min(sizes) < 0:
            raise _Corrupt(start, f"lace sizes of block at offset {start} overrun the block")
        ranges = []
        for size in sizes:
            ranges.append((p, p + size))
            p += size
        return ranges

    def _xiph_sizes(self, p: int, end: int, count: int) -> tuple[list[int], int]:
        buf = self._buf
        sizes = []
        for _ in range(count - 1):
            size = 0
            while p < end:
                byte = buf[p]
                p += 1
                size += byte
                if byte != 0xFF:
                    break
            sizes.append(size)
        return sizes, p

    def _ebml_lace_sizes(self, p: int, end: int, count: int) -> tuple[list[int], int]:
        if count == 1:
            return [], p
        buf = self._buf
        first, length = read_size(buf, p)
        p += length
        sizes = [first]
        for _ in range(count - 2):
            raw, length = read_size(buf, p)
            p += length
            # Later sizes are differences, stored with a bias to make them unsigned.
            sizes.append(sizes[-1] + raw - ((1 << (7 * length - 1)) - 1))
        return sizes, p
