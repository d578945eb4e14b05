"""In-memory fragment store of the emulated KVS data plane.

Holds every persisted fragment per stream (keyed by stream ARN), hands out
fragment numbers, tracks which streams have a producer connected, and lets
GetMedia readers block on a condition variable until the next fragment lands.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from callstream.local.kvs_fragmenter import MediaFragment

# 47 decimal digits, like real KVS fragment numbers; the offset grows with the
# wall clock so numbers also increase across emulator restarts.
_NUMBER_BASE = 91343852333181551234925834077012571618243808844 - (1 << 62)


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


@dataclass
class _StreamMedia:
    fragments: list[StoredFragment] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)
    producers: int = 0
    last_producer_gone: float | None = None


class FragmentStore:
    """Thread-safe store shared by the PutMedia and GetMedia handlers."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._streams: dict[str, _StreamMedia] = {}
        self._last_number = 0
        self._closed = False

    def next_number(self) -> int:
        """A new fragment number, strictly greater than every one handed out before."""
        with self._cond:
            candidate = _NUMBER_BASE + (int(self._clock() * 1000) << 20)
            self._last_number = max(candidate, self._last_number + 1)
            return self._last_number

    def producer_connected(self, stream_arn: str) -> None:
        """A PutMedia connection opened on the stream: GetMedia readers stay live."""
        with self._cond:
            self._stream(stream_arn).producers += 1

    def producer_disconnected(self, stream_arn: str) -> None:
        """A PutMedia connection closed; readers may end once they are caught up."""
        with self._cond:
            media = self._stream(stream_arn)
            media.producers -= 1
            media.last_producer_gone = self._clock()
            self._cond.notify_all()

    def append(self, stream_arn: str, fragment: StoredFragment) -> None:
        """Persist a fragment and wake every reader waiting on the stream."""
        with self._cond:
            media = self._stream(stream_arn)
            index = bisect.bisect(media.numbers, fragment.number)
            media.numbers.insert(index, fragment.number)
            media.fragments.insert(index, fragment)
            self._cond.notify_all()

    def fragments(self, stream_arn: str) -> list[StoredFragment]:
        """Every stored fragment of the stream, in fragment-number order."""
        with self._cond:
            return list(self._stream(stream_arn).fragments)

    def last_number(self, stream_arn: str) -> int:
        """Number of the newest stored fragment (0 when there is none)."""
        with self._cond:
            numbers = self._stream(stream_arn).numbers
            return numbers[-1] if numbers else 0

    def is_live(self, stream_arn: str) -> bool:
        """Whether a producer is connected to the stream right now."""
        with self._cond:
            return self._stream(stream_arn).producers > 0

    def wait_next(self, stream_arn: str, after: int, idle_timeout: float) -> StoredFragment | None:
        """The first fragment numbered above `after`, waiting while the stream is live.

        Returns None when the store is closed, or once no producer is
        connected, nothing is left to send and `idle_timeout` seconds have
        passed since the last producer left (since this call, on a stream
        that never had a producer).
        """
        started = self._clock()
        with self._cond:
            while not self._closed:
                media = self._stream(stream_arn)
                index = bisect.bisect_right(media.numbers, after)
                if index < len(media.fragments):
                    return media.fragments[index]
                if media.producers > 0:
                    self._cond.wait()
                    continue
                since = media.last_producer_gone
                deadline = (started if since is None else since) + idle_timeout
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    def close(self) -> None:
        """Wake every waiting reader for good (emulator shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _stream(self, stream_arn: str) -> _StreamMedia:
        media = self._streams.get(stream_arn)
        if media is None:
            media = self._streams[stream_arn] = _StreamMedia()
        return media
