"""The replay cache: what a small Info, Tracks or Tags element did, keyed by its bytes.

KVS repeats the same Tags (ContactId, InstanceId, MimeType, the track tags)
and Tracks in every fragment; their effect is a function of their bytes, so
the reader repeats it for identical bytes instead of reading them again. The
cache also remembers which cached element followed which, so a whole run of
them costs one byte comparison per element.
"""

from __future__ import annotations

from collections.abc import Callable

from callstream.mkv.framing import NO_END

# What an element did, to repeat at the given start offset.
Replay = Callable[[int], None]

CACHE_MAX_BYTES = 4096
_CACHE_ENTRIES = 512


class ReplayCache:
    """Element bytes -> their replay, and element bytes -> the bytes that came next."""

    def __init__(self) -> None:
        self._replays: dict[bytes, Replay] = {}
        self._successors: dict[bytes, bytes] = {}
        self._last_raw: bytes | None = None
        self._last_end = NO_END

    def get(self, raw: bytes) -> Replay | None:
        return self._replays.get(raw)

    def store(self, raw: bytes, replay: Replay) -> None:
        """Remember `replay` for `raw`; a full cache starts again empty."""
        if len(self._replays) >= _CACHE_ENTRIES:
            self._replays.clear()
            self._successors.clear()
        self._replays[raw] = replay

    def learn(self, raw: bytes, start: int) -> None:
        """Note that the cached element `raw` at `start` came right after the last one."""
        if self._last_end == start and self._last_raw is not None:
            self._successors[self._last_raw] = raw
        self._last_raw, self._last_end = raw, start + len(raw)

    def follow(self, raw: bytes, buf: bytearray, base: int, pos: int, limit: int) -> int:
        """Replay the cached elements that followed `raw` last time, while the bytes match.

        `buf[pos:]` comes right after `raw` (`base` is buf[0]'s offset); nothing is
        replayed past `limit`, the Segment's end. Returns where replaying stopped.
        """
        successors, replays = self._successors, self._replays
        while True:
            following = successors.get(raw)
            if following is None or not buf.startswith(following, pos):
                break
            end = pos + len(following)
            replay = replays.get(following)
            if replay is None or NO_END != limit < base + end:
                break
            replay(base + pos)
            raw, pos = following, end
        self._last_raw, self._last_end = raw, base + pos
        return pos
