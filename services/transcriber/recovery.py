"""What a track keeps so a failed recognition stream loses no audio, and when to retry.

`AudioSpool` holds the PCM a track sent since its last final segment, as
call-relative pieces, capped in length: a new stream after a failure resends
it. `StreamClock` maps a stream's own times (ms from its first sample, keep-alive
silence included) back to call time. `RecoveryPolicy` says how long to back off,
how often to send keep-alive silence and when to roll a long stream over.
All pure: no clocks, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from callstream.audio import BYTES_PER_MS
from callstream.timemap import RunMap


@dataclass(frozen=True)
class RecoveryPolicy:
    """Retry, keep-alive and rollover tuning of the transcriber (seconds unless named _ms).

    Backoff is exponential with "equal jitter": attempt n waits between half and
    all of min(`backoff_max_s`, `backoff_base_s` * 2**(n-1)).
    """

    max_retries: int = 8  # new streams after consecutive failures, before a track is given up
    backoff_base_s: float = 0.25
    backoff_max_s: float = 20.0
    resend_limit_ms: int = 300_000  # audio kept per track for a resend; older is dropped
    # Transcribe ends a stream after 15 s without audio; None: no keep-alive (an
    # engine without that limit is better off without silence mid-utterance).
    keepalive_after_s: float | None = 5.0
    keepalive_ms: int = 1_000  # silence sent each time
    rollover_ms: int = 14_100_000  # 3 h 55 min of stream audio: below Transcribe's 4 h
    rollover_grace_ms: int = 120_000  # how long a rollover waits for a pause in speech

    def backoff_s(self, attempt: int, unit_random: float) -> float:
        """Delay before retry number `attempt` (1-based); `unit_random` in [0, 1)."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(0, attempt - 1))
        return cap / 2 + unit_random * cap / 2


@dataclass
class _Piece:
    """Audio that starts at `call_ms` of the call."""

    call_ms: int
    pcm: bytes

    @property
    def end_ms(self) -> int:
        return self.call_ms + len(self.pcm) // BYTES_PER_MS


class AudioSpool:
    """A track's audio since its last final: what a new stream must hear again."""

    def __init__(self, limit_ms: int) -> None:
        self.limit_ms = limit_ms
        self._pieces: deque[_Piece] = deque()
        self._ms = 0
        self.dropped_ms = 0  # audio pushed out by the limit, so not resendable

    def __len__(self) -> int:
        return len(self._pieces)

    @property
    def ms(self) -> int:
        """Milliseconds of audio held."""
        return self._ms

    def add(self, call_ms: int, pcm: bytes) -> int:
        """Keep `pcm` (starting at `call_ms`); returns ms dropped to stay within the limit."""
        self._pieces.append(_Piece(call_ms, pcm))
        self._ms += len(pcm) // BYTES_PER_MS
        dropped = 0
        while self._ms > self.limit_ms and len(self._pieces) > 1:
            old = self._pieces.popleft()
            self._ms -= len(old.pcm) // BYTES_PER_MS
            dropped += len(old.pcm) // BYTES_PER_MS
        self.dropped_ms += dropped
        return dropped

    def release_before(self, call_ms: int) -> None:
        """Forget audio before `call_ms`: a final covers it."""
        while self._pieces and self._pieces[0].end_ms <= call_ms:
            old = self._pieces.popleft()
            self._ms -= len(old.pcm) // BYTES_PER_MS
        if self._pieces and self._pieces[0].call_ms < call_ms:
            first = self._pieces[0]
            cut = (call_ms - first.call_ms) * BYTES_PER_MS
            self._pieces[0] = _Piece(call_ms, first.pcm[cut:])
            self._ms -= cut // BYTES_PER_MS

    def pieces(self) -> list[tuple[int, bytes]]:
        """The held audio as (call ms, pcm), oldest first."""
        return [(p.call_ms, p.pcm) for p in self._pieces]

    def clear(self) -> None:
        self._pieces.clear()
        self._ms = 0


class StreamClock:
    """Maps one stream's times to call time (ms); keep-alive silence maps to no call time."""

    def __init__(self) -> None:
        self.sent_ms = 0  # stream time of the next sample
        self._runs = RunMap()  # (stream ms, call ms, length ms)

    def audio(self, call_ms: int, length_ms: int) -> None:
        """Real audio of the call went out next."""
        self._runs.add(self.sent_ms, call_ms, length_ms)
        self.sent_ms += length_ms

    def silence(self, length_ms: int) -> None:
        """Filler silence went out next."""
        self.sent_ms += length_ms

    def to_call(self, stream_ms: int, *, rounding_up: bool) -> int | None:
        """Call time of a stream time. Inside filler silence: the next audio's start
        (`rounding_up`) or the previous audio's end; None if there is none."""
        runs = self._runs
        i = runs.index(stream_ms)
        if i < 0:
            return runs[0][1] if rounding_up and len(runs) else None
        s0, c0, n = runs[i]
        if stream_ms <= s0 + n or self._open_ended(i):
            return c0 + stream_ms - s0
        if rounding_up:
            return runs[i + 1][1] if i + 1 < len(runs) else None
        return c0 + n

    def span(self, start_ms: int, end_ms: int) -> tuple[int, int] | None:
        """Call-time span of a stream-time span, or None if it lies in filler silence."""
        start = self.to_call(start_ms, rounding_up=True)
        end = self.to_call(end_ms, rounding_up=False)
        if start is None or end is None:
            return None
        if end <= start and not (self._inside_audio(start_ms) or self._inside_audio(end_ms)):
            return None
        return start, max(start, end)

    def forget_before(self, stream_ms: int) -> None:
        """Drop runs that end before `stream_ms`; no later result reaches back there."""
        self._runs.forget_before(stream_ms)

    def _open_ended(self, i: int) -> bool:
        """Run `i` is the last and nothing was sent after it: it reaches any later time."""
        s0, _, n = self._runs[i]
        return i == len(self._runs) - 1 and s0 + n == self.sent_ms

    def _inside_audio(self, stream_ms: int) -> bool:
        i = self._runs.index(stream_ms)
        if i < 0:
            return False
        s0, _, n = self._runs[i]
        return stream_ms <= s0 + n or self._open_ended(i)
