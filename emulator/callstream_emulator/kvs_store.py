"""In-memory fragment store of the emulated KVS data plane.

Holds every fragment per stream (keyed by stream ARN), hands out fragment
numbers, tracks which streams have a producer connected, and lets GetMedia
readers block until there is more to send.

A fragment is stored as it arrives, as real KVS streams it: `open()` when its
Cluster starts (number, timestamps, the header and leading tags known), then
`grow()` with Cluster bytes and `add_trailing()` with tags after it, then
`complete()` once the next fragment starts or the producer ends (or `abort()`
if the producer broke off inside it). GetMedia follows an open fragment with
`follow()`; ListFragments and GetMediaForFragmentList see complete ones only.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from callstream_emulator.kvs_fragmenter import MediaFragment

# 47 decimal digits, like real KVS fragment numbers; the offset grows with the
# wall clock so numbers also increase across emulator restarts.
_NUMBER_BASE = 91343852333181551234925834077012571618243808844 - (1 << 62)

OPEN = "open"
COMPLETE = "complete"
ABORTED = "aborted"
CLOSED = "closed"  # the store itself (emulator shutdown)


@dataclass(frozen=True)
class StoredFragment:
    """A persisted fragment with its server-assigned identity and timestamps."""

    number: int
    server_ms: int
    producer_ms: int
    media: MediaFragment

    @property
    def number_str(self) -> str:
        """The fragment number as the API spells it (47 decimal digits)."""
        return str(self.number)


@dataclass(frozen=True)
class FragmentHead:
    """What is known of a fragment once its Cluster starts: all GetMedia sends before it."""

    number: int
    server_ms: int
    producer_ms: int
    info: bytes
    tracks: bytes
    leading_tags: tuple[bytes, ...]

    @classmethod
    def of(cls, stored: StoredFragment) -> FragmentHead:
        """The head of a complete fragment."""
        media = stored.media
        return cls(
            stored.number,
            stored.server_ms,
            stored.producer_ms,
            media.info,
            media.tracks,
            media.leading_tags,
        )


@dataclass
class LiveFragment:
    """A fragment as it is being stored: the Cluster and trailing tags grow until complete."""

    head: FragmentHead
    cluster: bytes | bytearray = field(default_factory=bytearray)
    trailing_tags: list[bytes] = field(default_factory=list)
    state: str = OPEN
    stored: StoredFragment | None = None

    @property
    def number(self) -> int:
        """The fragment number."""
        return self.head.number

    @classmethod
    def of(cls, stored: StoredFragment) -> LiveFragment:
        """A complete fragment in the live shape."""
        media = stored.media
        return cls(
            FragmentHead.of(stored),
            media.cluster,
            list(media.trailing_tags),
            COMPLETE,
            stored,
        )


@dataclass(frozen=True)
class Progress:
    """What `follow()` found: Cluster bytes and trailing tags not sent yet, and the state."""

    cluster: bytes
    trailing_tags: tuple[bytes, ...]
    state: str


class _StreamMedia:
    def __init__(self, lock: threading.Lock) -> None:
        self.cond = threading.Condition(lock)
        self.fragments: list[LiveFragment] = []
        self.numbers: list[int] = []
        self.producers = 0
        self.last_producer_gone: float | None = None


class FragmentStore:
    """Thread-safe store shared by PutMedia and GetMedia: one lock, one wake-up per stream."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, _StreamMedia] = {}
        self._last_number = 0
        self._closed = False

    def next_number(self) -> int:
        """A new fragment number, strictly greater than every one handed out before."""
        with self._lock:
            candidate = _NUMBER_BASE + (int(self._clock() * 1000) << 20)
            self._last_number = max(candidate, self._last_number + 1)
            return self._last_number

    def producer_connected(self, stream_arn: str) -> None:
        """A PutMedia connection opened on the stream: GetMedia readers stay live."""
        with self._lock:
            self._stream(stream_arn).producers += 1

    def producer_disconnected(self, stream_arn: str) -> None:
        """A PutMedia connection closed; readers may end once they are caught up."""
        with self._lock:
            media = self._stream(stream_arn)
            media.producers -= 1
            media.last_producer_gone = self._clock()
            media.cond.notify_all()

    # -- writing ------------------------------------------------------------------------

    def open(self, stream_arn: str, head: FragmentHead, cluster: bytes) -> LiveFragment:
        """A fragment's Cluster started with `cluster` (its first bytes): readers may begin it."""
        live = LiveFragment(head, bytearray(cluster))
        with self._lock:
            self._insert(self._stream(stream_arn), live)
        return live

    def grow(self, stream_arn: str, live: LiveFragment, data: bytes) -> None:
        """More bytes of an open fragment's Cluster."""
        with self._lock:
            assert isinstance(live.cluster, bytearray) and live.state == OPEN
            live.cluster += data
            self._stream(stream_arn).cond.notify_all()

    def add_trailing(self, stream_arn: str, live: LiveFragment, tags: bytes) -> None:
        """A Tags element after an open fragment's Cluster."""
        with self._lock:
            live.trailing_tags.append(tags)
            self._stream(stream_arn).cond.notify_all()

    def complete(self, stream_arn: str, live: LiveFragment, stored: StoredFragment) -> None:
        """The open fragment is whole (its bytes are the stored fragment's)."""
        with self._lock:
            live.cluster = stored.media.cluster  # one copy, and readers' offsets still hold
            live.trailing_tags = list(stored.media.trailing_tags)
            live.stored = stored
            live.state = COMPLETE
            self._stream(stream_arn).cond.notify_all()

    def abort(self, stream_arn: str, live: LiveFragment) -> None:
        """The producer broke off inside the fragment: it is dropped, readers of it are cut."""
        with self._lock:
            if live.state != OPEN:
                return
            live.state = ABORTED
            media = self._stream(stream_arn)
            index = bisect.bisect_left(media.numbers, live.number)
            if index < len(media.numbers) and media.fragments[index] is live:
                del media.numbers[index]
                del media.fragments[index]
            media.cond.notify_all()

    def append(self, stream_arn: str, fragment: StoredFragment) -> None:
        """Persist a complete fragment at once and wake every reader waiting on the stream."""
        with self._lock:
            self._insert(self._stream(stream_arn), LiveFragment.of(fragment))

    # -- reading ------------------------------------------------------------------------

    def fragments(self, stream_arn: str) -> list[StoredFragment]:
        """Every complete fragment of the stream, in fragment-number order."""
        with self._lock:
            return [f.stored for f in self._stream(stream_arn).fragments if f.stored is not None]

    def last_number(self, stream_arn: str) -> int:
        """Number of the newest complete fragment (0 when there is none)."""
        with self._lock:
            for fragment in reversed(self._stream(stream_arn).fragments):
                if fragment.state == COMPLETE:
                    return fragment.number
            return 0

    def wait_next(self, stream_arn: str, after: int, idle_timeout: float) -> LiveFragment | None:
        """The first fragment (open or complete) numbered above `after`, waiting while live.

        Returns None when the store is closed, or once no producer is
        connected, nothing is left to send and `idle_timeout` seconds have
        passed since the last producer left (since this call, on a stream
        that never had a producer).
        """
        started = self._clock()
        with self._lock:
            while not self._closed:
                media = self._stream(stream_arn)
                index = bisect.bisect_right(media.numbers, after)
                if index < len(media.fragments):
                    return media.fragments[index]
                if media.producers > 0:
                    media.cond.wait()
                    continue
                since = media.last_producer_gone
                deadline = (started if since is None else since) + idle_timeout
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                media.cond.wait(remaining)
            return None

    def follow(
        self, stream_arn: str, live: LiveFragment, cluster_sent: int, trailing_sent: int
    ) -> Progress:
        """What the fragment gained past the given offsets; waits while it is open and unchanged."""
        with self._lock:
            media = self._stream(stream_arn)
            while True:
                state = CLOSED if self._closed and live.state == OPEN else live.state
                cluster = bytes(live.cluster[cluster_sent:])
                trailing = tuple(live.trailing_tags[trailing_sent:])
                if cluster or trailing or state != OPEN:
                    return Progress(cluster, trailing, state)
                media.cond.wait()

    def close(self) -> None:
        """Wake every waiting reader for good (emulator shutdown)."""
        with self._lock:
            self._closed = True
            for media in self._streams.values():
                media.cond.notify_all()

    def _insert(self, media: _StreamMedia, live: LiveFragment) -> None:
        index = bisect.bisect(media.numbers, live.number)
        media.numbers.insert(index, live.number)
        media.fragments.insert(index, live)
        media.cond.notify_all()

    def _stream(self, stream_arn: str) -> _StreamMedia:
        media = self._streams.get(stream_arn)
        if media is None:
            media = self._streams[stream_arn] = _StreamMedia(self._lock)
        return media
