"""Split a PutMedia byte stream into KVS fragments at Cluster boundaries.

Pure: bytes go in as they arrive, fragment events come out. Only element
boundaries are read (plus the Cluster Timecode and the Info TimecodeScale);
blocks are never decoded, and Cluster bytes are kept exactly as received.

Rules, as the emulator's KVS media endpoint applies them:
- The stream must start with an EBML header. A producer may start a new EBML
  header + Segment at any time (GetMedia outputs are valid producer input).
- Segment children are read as if they were top-level; Segment sizes (known
  or unknown) are not enforced.
- Tags before a Segment's first Cluster are that Cluster's leading tags. Tags
  after a Cluster are its trailing tags, up to the next Cluster, EBML header,
  Segment, Info or Tracks, or the end of the stream; that is also when the
  fragment is complete. So a fragment is released whole (`MediaFragment`)
  when the next one starts; before that it is reported as it arrives:
  `FragmentStarted` once its Cluster Timecode is read (with the header,
  leading tags and Cluster bytes so far), `ClusterData` with the Cluster
  bytes each `feed()` added, `TrailingTags` for each Tags element after it.
- Tags elements holding only reserved `AWS_KINESISVIDEO_*` tags are dropped
  (the server writes its own), so a GetMedia output fed back in does not
  carry two fragment numbers.
- Void, CRC-32, SeekHead, Cues, Chapters and Attachments are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from callstream.mkv.ebml import (
    CLUSTER,
    EBML,
    INFO,
    SEGMENT,
    SEGMENT_CHILDREN,
    SIMPLE_TAG,
    TAG,
    TAG_NAME,
    TAGS,
    TIMECODE,
    TIMECODE_SCALE,
    TOP_LEVEL,
    TRACKS,
    UNKNOWN_SIZE,
    InvalidEbml,
    NeedMoreData,
    read_id,
    read_size,
)

RESERVED_TAG_PREFIX = "AWS_KINESISVIDEO_"
DEFAULT_TIMECODE_SCALE = 1_000_000
# Elements we hold whole in memory (headers, tags, a Timecode); anything
# claiming more than this is treated as corrupt input rather than buffered.
MAX_BUFFERED_ELEMENT = 16 * 1024 * 1024
_BUFFERED = frozenset({EBML, INFO, TRACKS, TAGS})


@dataclass(frozen=True)
class FragmentStarted:
    """A Cluster began arriving; its Timecode is known.

    `cluster_head` holds the Cluster's bytes so far (header and Timecode at
    least); `info`, `tracks` and `leading_tags` are the fragment's, as
    `MediaFragment` will carry them. (No `cluster` attribute: callers tell a
    whole fragment by it.)
    """

    timecode: int
    timecode_scale: int
    info: bytes = b""
    tracks: bytes = b""
    leading_tags: tuple[bytes, ...] = ()
    cluster_head: bytes = b""

    @property
    def timecode_ms(self) -> int:
        """The Cluster Timecode in milliseconds."""
        return self.timecode * self.timecode_scale // 1_000_000


@dataclass(frozen=True)
class ClusterData:
    """More bytes of the started fragment's Cluster, exactly as received."""

    data: bytes


@dataclass(frozen=True)
class TrailingTags:
    """A Tags element after the started fragment's Cluster (one of its trailing tags)."""

    tags: bytes


@dataclass(frozen=True)
class MediaFragment:
    """One complete fragment: the Cluster with the context a reader needs."""

    info: bytes
    tracks: bytes
    leading_tags: tuple[bytes, ...]
    cluster: bytes
    trailing_tags: tuple[bytes, ...]
    timecode: int
    timecode_scale: int

    @property
    def timecode_ms(self) -> int:
        """The Cluster Timecode in milliseconds."""
        return self.timecode * self.timecode_scale // 1_000_000


FragmenterEvent = FragmentStarted | ClusterData | TrailingTags | MediaFragment


@dataclass
class _Cluster:
    data: bytearray
    remaining: int | None  # payload bytes left for a known-size Cluster
    timecode: int | None = None
    reported: int = 0  # bytes of `data` already reported (FragmentStarted, ClusterData)


class Fragmenter:
    """Incremental splitter: `feed()` bytes as they come, `close()` at the end."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._seen_header = False
        self._info = b""
        self._tracks = b""
        self._scale = DEFAULT_TIMECODE_SCALE
        self._leading: list[bytes] = []
        self._trailing: list[bytes] = []
        self._cluster: _Cluster | None = None
        self._done: _Cluster | None = None
        self._done_leading: tuple[bytes, ...] = ()
        self._copy = 0  # payload bytes of the current Cluster child still to copy
        self._discard = 0  # bytes of an ignored top-level element still to skip

    def feed(self, data: bytes) -> list[FragmenterEvent]:
        """Consume `data`; return the events it completes. Raises InvalidEbml."""
        self._buf += data
        events: list[FragmenterEvent] = []
        try:
            while self._pos < len(self._buf):
                self._step(events)
        except NeedMoreData:
            pass
        if self._cluster is not None:
            self._report(self._cluster, events)
        del self._buf[: self._pos]
        self._pos = 0
        return events

    def close(self) -> list[FragmenterEvent]:
        """End of stream: release the last fragment; InvalidEbml if it was cut short."""
        events: list[FragmenterEvent] = []
        cluster = self._cluster
        if cluster is not None:
            if cluster.remaining or self._copy or self._buf:
                raise InvalidEbml("stream ended inside a Cluster")
            self._end_cluster(events)
        elif self._buf or self._discard:
            raise InvalidEbml(f"stream ended inside an element ({len(self._buf)} bytes left)")
        self._finish(events)
        return events

    def _step(self, events: list[FragmenterEvent]) -> None:
        if self._discard:
            taken = min(self._discard, len(self._buf) - self._pos)
            self._pos += taken
            self._discard -= taken
        elif self._cluster is not None:
            self._step_cluster(events)
        else:
            self._step_top(events)

    def _step_top(self, events: list[FragmenterEvent]) -> None:
        eid, id_len = read_id(self._buf, self._pos)
        size, size_len = read_size(self._buf, self._pos + id_len)
        if not self._seen_header and eid != EBML:
            raise InvalidEbml(f"stream must start with an EBML header, got ID 0x{eid:X}")
        if eid not in SEGMENT_CHILDREN and eid not in TOP_LEVEL:
            raise InvalidEbml(f"unexpected top-level element 0x{eid:X} at a Segment's level")
        head = id_len + size_len
        if eid in (SEGMENT, CLUSTER):
            self._finish(events)
            if eid == CLUSTER:
                remaining = None if size == UNKNOWN_SIZE else size
                header = bytearray(self._buf[self._pos : self._pos + head])
                self._cluster = _Cluster(header, remaining)
            self._pos += head
            return
        if size == UNKNOWN_SIZE:
            raise InvalidEbml(f"element 0x{eid:X} has an unknown size")
        if eid not in _BUFFERED:
            self._pos += head
            self._discard = size
            return
        if size > MAX_BUFFERED_ELEMENT:
            raise InvalidEbml(f"element 0x{eid:X} claims {size} bytes")
        end = self._pos + head + size
        if end > len(self._buf):
            raise NeedMoreData
        payload = bytes(self._buf[self._pos + head : end])
        whole = bytes(self._buf[self._pos : end])
        self._pos = end
        self._top_element(eid, whole, payload, events)

    def _top_element(
        self, eid: int, whole: bytes, payload: bytes, events: list[FragmenterEvent]
    ) -> None:
        if eid == TAGS:
            if _is_reserved_tags(payload):
                return
            if self._done is not None:
                self._trailing.append(whole)
                events.append(TrailingTags(whole))
            else:
                self._leading.append(whole)
            return
        self._finish(events)
        if eid == EBML:
            self._seen_header = True
        elif eid == INFO:
            self._info = whole
            self._scale = _timecode_scale(payload)
        elif eid == TRACKS:
            self._tracks = whole

    def _step_cluster(self, events: list[FragmenterEvent]) -> None:
        cluster = self._cluster
        assert cluster is not None
        if self._copy:
            count = min(self._copy, len(self._buf) - self._pos)
            self._copy -= count
            self._take(count, events)
            return
        if cluster.remaining == 0:
            self._end_cluster(events)
            return
        eid, id_len = read_id(self._buf, self._pos)
        if cluster.remaining is None and (eid in SEGMENT_CHILDREN or eid in TOP_LEVEL):
            self._end_cluster(events)
            return
        size, size_len = read_size(self._buf, self._pos + id_len)
        if size == UNKNOWN_SIZE:
            raise InvalidEbml(f"Cluster child 0x{eid:X} has an unknown size")
        head = id_len + size_len
        if cluster.remaining is not None and head + size > cluster.remaining:
            raise InvalidEbml(f"Cluster child 0x{eid:X} runs past the end of its Cluster")
        if eid == TIMECODE:
            self._read_timecode(cluster, head, size, events)
            return
        self._copy = size
        self._take(head, events)

    def _read_timecode(
        self, cluster: _Cluster, head: int, size: int, events: list[FragmenterEvent]
    ) -> None:
        if size > 8:
            raise InvalidEbml(f"Cluster Timecode of {size} bytes")
        end = self._pos + head + size
        if end > len(self._buf):
            raise NeedMoreData
        cluster.timecode = int.from_bytes(self._buf[self._pos + head : end], "big")
        cluster.data += self._buf[self._pos : end]
        self._pos = end
        if cluster.remaining is not None:
            cluster.remaining -= head + size
        cluster.reported = len(cluster.data)
        events.append(
            FragmentStarted(
                cluster.timecode,
                self._scale,
                self._info,
                self._tracks,
                tuple(self._leading),
                bytes(cluster.data),
            )
        )
        if cluster.remaining == 0:
            self._end_cluster(events)

    def _take(self, count: int, events: list[FragmenterEvent]) -> None:
        """Move `count` buffered bytes into the current Cluster."""
        cluster = self._cluster
        assert cluster is not None
        cluster.data += self._buf[self._pos : self._pos + count]
        self._pos += count
        if cluster.remaining is not None:
            cluster.remaining -= count
            if cluster.remaining == 0 and not self._copy:
                self._end_cluster(events)

    def _report(self, cluster: _Cluster, events: list[FragmenterEvent]) -> None:
        """ClusterData with the started Cluster's bytes not reported yet."""
        if cluster.timecode is not None and len(cluster.data) > cluster.reported:
            events.append(ClusterData(bytes(cluster.data[cluster.reported :])))
            cluster.reported = len(cluster.data)

    def _end_cluster(self, events: list[FragmenterEvent]) -> None:
        cluster = self._cluster
        assert cluster is not None
        if cluster.timecode is None:
            raise InvalidEbml("Cluster without a Timecode")
        self._report(cluster, events)
        self._cluster = None
        self._done = cluster
        self._done_leading = tuple(self._leading)
        self._leading = []

    def _finish(self, events: list[FragmenterEvent]) -> None:
        """Release the completed fragment, if any, with its trailing tags."""
        done = self._done
        if done is None:
            return
        assert done.timecode is not None
        events.append(
            MediaFragment(
                info=self._info,
                tracks=self._tracks,
                leading_tags=self._done_leading,
                cluster=bytes(done.data),
                trailing_tags=tuple(self._trailing),
                timecode=done.timecode,
                timecode_scale=self._scale,
            )
        )
        self._done = None
        self._trailing = []


def iter_children(payload: bytes) -> list[tuple[int, bytes]]:
    """(id, payload) of each child of a master element; InvalidEbml if malformed."""
    children = []
    pos = 0
    try:
        while pos < len(payload):
            eid, id_len = read_id(payload, pos)
            size, size_len = read_size(payload, pos + id_len)
            start = pos + id_len + size_len
            if size == UNKNOWN_SIZE or start + size > len(payload):
                raise InvalidEbml(f"child 0x{eid:X} does not fit its parent")
            children.append((eid, payload[start : start + size]))
            pos = start + size
    except NeedMoreData as e:
        raise InvalidEbml("truncated child element") from e
    return children


def tag_names(tags_payload: bytes) -> list[str]:
    """The TagName of every SimpleTag in a Tags payload."""
    names = []
    for tag_id, tag in iter_children(tags_payload):
        if tag_id != TAG:
            continue
        for simple_id, simple in iter_children(tag):
            if simple_id != SIMPLE_TAG:
                continue
            for child_id, value in iter_children(simple):
                if child_id == TAG_NAME:
                    names.append(value.decode("utf-8", "replace").rstrip("\0"))
    return names


def _is_reserved_tags(tags_payload: bytes) -> bool:
    names = tag_names(tags_payload)
    return bool(names) and all(name.startswith(RESERVED_TAG_PREFIX) for name in names)


def _timecode_scale(info_payload: bytes) -> int:
    for eid, value in iter_children(info_payload):
        if eid == TIMECODE_SCALE:
            return int.from_bytes(value, "big") or DEFAULT_TIMECODE_SCALE
    return DEFAULT_TIMECODE_SCALE
