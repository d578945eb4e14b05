"""Push parser for Matroska as Kinesis Video Streams delivers it: bytes in, events out.

`MkvStreamReader.feed` takes whatever chunk the network gave and returns the
events it completed; chunk boundaries never change the events. A frame is
reported as soon as its block is complete, never at the end of its Cluster.
Memory stays bounded: only the element being read is buffered, and elements the
reader does not need (Cues, SeekHead, Void, CodecPrivate, ...) are skipped as
their bytes arrive. On corrupt input the reader reports a `StreamError` and
resynchronises at the next EBML header it can verify.

This module is the push loop: the buffer, the stack of open elements and which
handler each element goes to. What the rules are (`framing`), how blocks
become frames (`blocks`, `lacing`), what tracks and tags mean (`tracks`),
how repeated metadata is replayed (`replay`) and how the reader finds its
feet again (`resync`) live in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from callstream.mkv.blocks import emit_block, scan_blocks
from callstream.mkv.ebml import (
    AUDIO,
    BLOCK,
    BLOCK_GROUP,
    CHANNELS,
    CLUSTER,
    CODEC_ID,
    EBML,
    INFO,
    NAME,
    REFERENCE_BLOCK,
    SAMPLING_FREQUENCY,
    SEGMENT,
    SIMPLE_BLOCK,
    SIMPLE_TAG,
    TAG,
    TAG_NAME,
    TAG_STRING,
    TAGS,
    TIMECODE,
    TIMECODE_SCALE,
    TRACK_ENTRY,
    TRACK_NUMBER,
    TRACK_TYPE,
    TRACK_UID,
    TRACKS,
    UNKNOWN_SIZE,
    InvalidEbml,
    NeedMoreData,
    element_name,
    read_element_header,
)
from callstream.mkv.framing import (
    CLOSES_UNKNOWN,
    NO_END,
    Corrupt,
    OpenElement,
    check_placement,
    check_size,
    child_header,
    cut_element,
    cut_master,
    cut_skipped,
)
from callstream.mkv.replay import CACHE_MAX_BYTES, ReplayCache
from callstream.mkv.reports import (
    ClusterEnded,
    ClusterStarted,
    MkvEvent,
    SegmentStarted,
    StreamError,
    TrackInfo,
    TracksRead,
)
from callstream.mkv.resync import next_header
from callstream.mkv.tracks import TagCollector, TrackCollector, collect_tags, tags_read

DEFAULT_TIMECODE_SCALE_NS = 1_000_000
DEFAULT_MAX_ELEMENT_SIZE = 64 * 1024 * 1024
# Small masters are walked once wholly buffered, which is faster than streaming
# them element by element; larger ones (Tracks with big CodecPrivate) stream.
_BATCHED = frozenset({INFO, TRACKS, TAGS})
_BATCH_LIMIT = 64 * 1024

_Key = tuple[int | None, int]


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
        self._stack: list[OpenElement] = []
        self._events: list[MkvEvent] = []
        self._resyncing = False
        self._closed = False
        self._scale = DEFAULT_TIMECODE_SCALE_NS
        self._track_names: dict[int, str | None] = {}
        self._header_offset: int | None = None
        self._cluster_start = 0
        self._cluster_tc: int | None = None
        self._group_referenced = False
        self._tracks = TrackCollector()
        self._tags = TagCollector()
        # What the last Info/Tracks/Tags did, to repeat for identical bytes.
        self._replay: Callable[[int], None] | None = None
        self._cache = ReplayCache()
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
            except Corrupt as exc:
                self._fail(exc.offset, exc.reason)

    def _run(self) -> bool:
        """Read elements while the buffer holds them; False when more bytes are needed.

        Runs of plain SimpleBlocks, nearly all of a stream, go through `scan_blocks`.
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
                raise Corrupt(here, f"invalid element ID or size at offset {here}") from None
            if eid in _BATCHED and self._replay_known(eid, size, header_len):
                continue
            if not self._dispatch(eid, size, header_len, here):
                return False
            if self._skip:
                return True

    def _scan_blocks(self, cluster: OpenElement) -> None:
        """The short path: a run of plain SimpleBlocks inside `cluster` (see `scan_blocks`)."""
        tc = self._cluster_tc
        if tc is None:
            return
        buf, base, n = self._buf, self._base, len(self._buf)
        bound = n if cluster.limit == NO_END else min(n, cluster.limit - base)
        self._pos = scan_blocks(
            buf,
            self._pos,
            bound,
            tc,
            self._scale,
            self._max_element_size,
            self._track_names,
            self._events.append,
        )

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
            or not 0 <= size <= CACHE_MAX_BYTES
            or end > len(self._buf)
            or NO_END != top.limit < self._base + end
        ):
            return False
        raw = bytes(self._buf[pos:end])
        replay = self._cache.get(raw)
        if replay is None:
            return False
        self._cache.learn(raw, self._base + pos)
        replay(self._base + pos)
        self._pos = self._cache.follow(raw, self._buf, self._base, end, top.limit)
        return True

    def _dispatch(self, eid: int, size: int, header_len: int, start: int) -> bool:
        """Act on the element whose header was just read; False when more bytes are needed."""
        parent = self._place(eid, start)
        key = (parent.element_id if parent else None, eid)
        end = NO_END if size == UNKNOWN_SIZE else start + header_len + size
        if end == NO_END or (parent is not None and NO_END != parent.limit < end):
            check_size(eid, start, size, end, parent)
        body = self._pos + header_len
        if key in self._masters:
            if end != NO_END and eid in _BATCHED and size <= _BATCH_LIMIT:
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
            raise Corrupt(start, f"{element_name(eid)} at offset {start} claims {size} bytes")
        if len(self._buf) - body < size:
            return False
        leaf(eid, start, body, body + size)
        self._pos = body + size
        return True

    def _place(self, eid: int, start: int) -> OpenElement | None:
        """End unknown-size elements that `eid` closes; check `eid` may appear here."""
        stack = self._stack
        while stack and stack[-1].end == NO_END:
            closers = CLOSES_UNKNOWN.get(stack[-1].element_id)
            if closers is None or eid not in closers:
                break
            self._pop(start)
        parent = stack[-1] if stack else None
        check_placement(parent.element_id if parent else None, eid, start)
        return parent

    def _open(self, key: _Key, start: int, end: int, parent: OpenElement | None) -> None:
        inherited = parent.limit if parent else NO_END
        self._stack.append(OpenElement(key[1], end, start, inherited if end == NO_END else end))
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

    def _read_batched(self, key: _Key, start: int, body: int, end: int) -> bool:
        """A small Info, Tracks or Tags: wait for all of it, then walk it or replay it.

        Its effect is a function of its bytes, so it is cached (`replay`).
        """
        b = end - self._base
        if len(self._buf) < b:
            return False
        raw = bytes(self._buf[start - self._base : b]) if end - start <= CACHE_MAX_BYTES else b""
        replay = self._cache.get(raw) if raw else None
        if replay is None:
            replay = self._first_reading(key, start, body, b, raw)
            if raw and replay is not None:
                self._cache.store(raw, replay)
        if replay is not None:
            if raw:
                self._cache.learn(raw, start)
            replay(start)
        self._pos = b
        return True

    def _first_reading(
        self, key: _Key, start: int, body: int, b: int, raw: bytes
    ) -> Callable[[int], None] | None:
        """Read a batched element not seen before; return what to replay for it."""
        self._replay = None
        # The view ends with the element, so nothing past it is ever read.
        if key[1] == TAGS and raw:
            pairs = collect_tags(raw, body - (start - self._base), len(raw), start)
            self._replay = partial(self._apply_tags, pairs)
        else:
            with memoryview(self._buf) as whole, whole[:b] as view:
                if key[1] == TAGS:
                    pairs = collect_tags(view, body, b, self._base)
                    self._replay = partial(self._apply_tags, pairs)
                else:
                    self._walk_master(key, start, body, b, view)
        return self._replay

    def _walk_master(self, key: _Key, start: int, a: int, b: int, view: memoryview) -> None:
        """Handle a master whose bytes buf[a:b] are all buffered, with its start and end."""
        opened = OpenElement(key[1], self._base + b, start, self._base + b)
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
            eid, size, header_len = child_header(view, pos, b, base)
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
        self._pos, found = next_header(self._buf, self._pos)
        if found:
            self._resyncing = False
        return found

    def _truncation(self) -> StreamError | None:
        """At end of input: the element cut off mid-way, if any."""
        here = self._base + self._pos
        if self._skip:
            return cut_skipped(self._skip_id, self._skip_start, self._skip)
        if self._pos < len(self._buf):
            return cut_element(self._buf, self._pos, here)
        return cut_master(self._stack, here)

    # -- what each element means -------------------------------------------------

    def _build_tables(self) -> None:
        """(parent ID, element ID) -> handler; elements not listed are skipped by size."""
        self._masters: dict[_Key, Callable[[int], None] | None] = {
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
        self._ends: dict[int, Callable[[OpenElement, int], None]] = {
            INFO: self._end_info,
            TRACKS: self._end_tracks,
            TRACK_ENTRY: self._end_track,
            TAGS: self._end_tags,
            SIMPLE_TAG: self._end_simple_tag,
            CLUSTER: self._end_cluster,
        }
        self._leaves: dict[_Key, Callable[[int, int, int, int], None]] = {
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

    def _start_info(self, start: int) -> None:
        self._scale = DEFAULT_TIMECODE_SCALE_NS

    def _on_timecode_scale(self, eid: int, start: int, a: int, b: int) -> None:
        self._scale = self._uint(a, b) or DEFAULT_TIMECODE_SCALE_NS

    def _end_info(self, opened: OpenElement, here: int) -> None:
        self._replay = partial(self._apply_info, self._scale)

    def _apply_info(self, scale: int, start: int) -> None:
        self._scale = scale

    def _start_tracks(self, start: int) -> None:
        self._tracks.start_tracks()

    def _start_track(self, start: int) -> None:
        self._tracks.start_track()

    def _on_track_field(self, eid: int, start: int, a: int, b: int) -> None:
        self._tracks.field(eid, self._buf[a:b])

    def _on_sampling_frequency(self, eid: int, start: int, a: int, b: int) -> None:
        self._tracks.sampling_frequency(start, self._buf[a:b])

    def _on_channels(self, eid: int, start: int, a: int, b: int) -> None:
        self._tracks.channels(self._buf[a:b])

    def _end_track(self, opened: OpenElement, here: int) -> None:
        self._tracks.end_track()

    def _end_tracks(self, opened: OpenElement, here: int) -> None:
        self._replay = partial(self._apply_tracks, self._tracks.tracks())

    def _apply_tracks(self, tracks: tuple[TrackInfo, ...], start: int) -> None:
        self._track_names = {t.number: t.name for t in tracks}
        self._events.append(TracksRead(tracks))

    def _start_tags(self, start: int) -> None:
        self._tags.start_tags()

    def _start_simple_tag(self, start: int) -> None:
        self._tags.start_simple_tag()

    def _on_tag_text(self, eid: int, start: int, a: int, b: int) -> None:
        self._tags.tag_text(eid, self._buf[a:b])

    def _end_simple_tag(self, opened: OpenElement, here: int) -> None:
        self._tags.end_simple_tag()

    def _end_tags(self, opened: OpenElement, here: int) -> None:
        self._replay = partial(self._apply_tags, self._tags.end_tags())

    def _apply_tags(self, pairs: tuple[tuple[str, str], ...], start: int) -> None:
        self._events.append(tags_read(pairs, start))

    def _start_cluster(self, start: int) -> None:
        self._cluster_start = start
        self._cluster_tc = None

    def _on_cluster_timecode(self, eid: int, start: int, a: int, b: int) -> None:
        self._cluster_tc = self._uint(a, b)
        timecode_ms = self._cluster_tc * self._scale // 1_000_000
        self._events.append(ClusterStarted(timecode_ms, self._cluster_start))

    def _end_cluster(self, opened: OpenElement, here: int) -> None:
        self._cluster_tc = None
        self._events.append(ClusterEnded(here))

    def _start_block_group(self, start: int) -> None:
        self._group_referenced = False

    def _on_reference_block(self, eid: int, start: int, a: int, b: int) -> None:
        self._group_referenced = True

    def _on_block(self, eid: int, start: int, a: int, b: int) -> None:
        """A SimpleBlock or a BlockGroup's Block, complete in the buffer: emit its frames."""
        # A Block has no keyframe flag; a ReferenceBlock before it says it is not one.
        keyframe = None if eid == SIMPLE_BLOCK else not self._group_referenced
        emit_block(
            self._buf,
            start,
            a,
            b,
            keyframe,
            self._cluster_tc,
            self._scale,
            self._track_names,
            self._events.append,
        )
