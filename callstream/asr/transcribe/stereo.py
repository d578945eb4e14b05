"""Amazon Transcribe with one stereo stream per call instead of one stream per track.

`StereoTranscribeEngine` is a `SpeechEngine` like `TranscribeEngine`, and the
transcriber core drives it the same way: one `RecognitionStream` per track.
Here each is a `StereoHandle` onto its call's shared `_Session`, which carries
both tracks in one Transcribe stream with channel identification: channel 0 is
AUDIO_FROM_CUSTOMER, channel 1 AUDIO_TO_CUSTOMER. This halves the streams a
call holds against the account's concurrent-stream quota.

- Interleaving (`StereoMux`): a frame goes out once both channels have its
  sample. A channel that lags is padded with silence only once the other is
  `max_lag_ms` ahead (so a track's audio waits at most that long for the
  other), and a channel without a handle, or whose handle closed, is padded
  at once.
- Times: each handle's `ChannelClock` maps stream time back to "ms of audio
  sent to this handle", so padding never shifts the core's own mapping; a
  result that lies wholly in padding is dropped.
- Failures: when the stream fails, each handle hands out its channel's results
  and then raises the error (a copy per handle). The core reopens each track
  after its own backoff; the new session waits (`rejoin_wait_s`) until every
  track that was live has reopened, pads the front of the shorter resend so
  both resends end together, and only then starts the stream.
- Closing a handle ends the stream (the other channel is flushed, padded). The
  core closes tracks one after another on one thread, so waiting for both would
  deadlock. The other handle gets its remaining results from its own `close()`
  (the end of a call). If it is sent audio instead (the other track rolled
  over; keep-alive silence counts), its next `poll()` raises
  `RetryableSpeechError` and the core resends its audio since its last final
  to a new stream. Its results that came after the end are then dropped, so
  a cut utterance is not finalised twice.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType

import numpy as np

from callstream.asr.port import (
    Hypothesis,
    RetryableSpeechError,
    SpeechEngineError,
    Word,
)
from callstream.asr.transcribe.engine import TranscribeEngine, TranscribeStream
from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE

_log = logging.getLogger(__name__)

TRACK_CHANNELS = {"AUDIO_FROM_CUSTOMER": 0, "AUDIO_TO_CUSTOMER": 1}
_SAMPLES_PER_MS = SAMPLE_RATE // 1000


# --- pure pieces: time mapping and interleaving ------------------------------------


class ChannelClock:
    """Maps stereo-stream time to one handle's own time (audio sent to the handle).

    Padding inserted into the channel maps to the handle time at which it was
    inserted, so a time inside padding and the audio edges around it agree.
    """

    def __init__(self) -> None:
        self._stream_starts: list[int] = []
        self._runs: list[tuple[int, int, int]] = []  # stream sample, handle sample, samples
        self.samples = 0  # handle samples so far

    def audio(self, stream_at: int, samples: int) -> None:
        """`samples` of the handle's audio occupy the stream from sample `stream_at`."""
        if samples <= 0:
            return
        if self._runs:
            s0, h0, n = self._runs[-1]
            if s0 + n == stream_at:
                self._runs[-1] = (s0, h0, n + samples)
                self.samples += samples
                return
        self._runs.append((stream_at, self.samples, samples))
        self._stream_starts.append(stream_at)
        self.samples += samples

    def to_handle_ms(self, stream_ms: int) -> int:
        """Handle time of a stream time; before the handle's first audio, 0."""
        at = stream_ms * _SAMPLES_PER_MS
        i = bisect.bisect_right(self._stream_starts, at) - 1
        if i < 0:
            return 0
        s0, h0, n = self._runs[i]
        return (h0 + min(at - s0, n)) // _SAMPLES_PER_MS

    def span(self, start_ms: int, end_ms: int) -> tuple[int, int] | None:
        """Handle-time span of a stream-time span; None if it lies wholly in padding."""
        start, end = self.to_handle_ms(start_ms), self.to_handle_ms(end_ms)
        if end <= start and end_ms > start_ms:
            return None
        return start, max(start, end)


class _SlotState(Enum):
    VACANT = "vacant"  # no handle: silence
    OPEN = "open"  # a handle sends audio
    DONE = "done"  # the handle closed: silence to the end


@dataclass
class _Slot:
    state: _SlotState = _SlotState.VACANT
    backlog: bytearray = field(default_factory=bytearray)
    position: int = 0  # stream samples placed on this channel (sent and backlog)
    clock: ChannelClock | None = None
    carry: bytes = b""

    @property
    def queued(self) -> int:
        return len(self.backlog) // BYTES_PER_SAMPLE

    def pad(self, samples: int) -> None:
        self.backlog += bytes(samples * BYTES_PER_SAMPLE)
        self.position += samples


class StereoMux:
    """Two mono channels in, interleaved 2-channel s16le frames out. Pure: no I/O.

    A frame is released once both open channels have its sample. When an open
    channel is more than `max_lag_ms` behind the other, it is padded with
    silence up to it (at `max_lag_ms` or more); vacant and finished channels
    are padded as needed.
    """

    def __init__(self, max_lag_ms: int = 1000) -> None:
        self.max_lag_samples = max_lag_ms * _SAMPLES_PER_MS
        self._slots = (_Slot(), _Slot())
        self.sent_samples = 0  # frames released
        self.padded_samples = [0, 0]  # silence inserted per channel

    def queued(self, channel: int) -> int:
        """Samples of `channel` waiting to be released."""
        return self._slots[channel].queued

    def attach(self, channel: int, lead_in_samples: int = 0) -> ChannelClock:
        """A handle takes a vacant channel, after `lead_in_samples` of silence."""
        slot = self._slots[channel]
        if slot.state is not _SlotState.VACANT:
            raise ValueError(f"channel {channel} is already taken ({slot.state.value})")
        slot.state, slot.clock = _SlotState.OPEN, ChannelClock()
        self._pad(channel, lead_in_samples)
        return slot.clock

    def push(self, channel: int, pcm: bytes) -> None:
        """Queue a handle's mono PCM on its channel."""
        slot = self._slots[channel]
        if slot.state is not _SlotState.OPEN or slot.clock is None:
            raise ValueError(f"channel {channel} takes no audio ({slot.state.value})")
        data = slot.carry + pcm
        cut = len(data) - len(data) % BYTES_PER_SAMPLE
        slot.carry = data[cut:]
        samples = cut // BYTES_PER_SAMPLE
        slot.clock.audio(slot.position, samples)
        slot.backlog += data[:cut]
        slot.position += samples

    def finish(self, channel: int) -> None:
        """The channel's handle closed: silence from the end of its queued audio on."""
        slot = self._slots[channel]
        if slot.state is _SlotState.OPEN:
            slot.state = _SlotState.DONE

    def take(self) -> bytes:
        """Frames that are ready now (maybe none)."""
        open_slots = [s for s in self._slots if s.state is _SlotState.OPEN]
        if len(open_slots) == 2:
            lag, lead = sorted(open_slots, key=lambda s: s.queued)
            # At the bound, not past it: a 1 s keep-alive on one track goes out at once.
            if lead.queued - lag.queued >= self.max_lag_samples:
                self._pad(self._slots.index(lag), lead.queued - lag.queued)
            count = min(s.queued for s in open_slots)
        elif open_slots:
            count = open_slots[0].queued
        else:
            count = max(s.queued for s in self._slots)
        return self._release(count)

    def flush(self) -> bytes:
        """Every queued sample, the other channel padded to match: the end of the stream."""
        return self._release(max(s.queued for s in self._slots))

    def _release(self, count: int) -> bytes:
        if count <= 0:
            return b""
        frames = np.empty((count, 2), dtype="<i2")
        for index, slot in enumerate(self._slots):
            self._pad(index, count - slot.queued)
            size = count * BYTES_PER_SAMPLE
            frames[:, index] = np.frombuffer(bytes(slot.backlog[:size]), dtype="<i2")
            del slot.backlog[:size]
        self.sent_samples += count
        return frames.tobytes()

    def _pad(self, channel: int, samples: int) -> None:
        if samples > 0:
            self._slots[channel].pad(samples)
            self.padded_samples[channel] += samples


# --- one stereo stream and its handles --------------------------------------------


class _State(Enum):
    PENDING = "pending"  # waiting for tracks to rejoin; no stream yet
    RUNNING = "running"
    ENDING = "ending"  # a handle closed: end of audio sent
    OVER = "over"  # the stream finished, cleanly or not


@dataclass(frozen=True)
class _Tuning:
    max_lag_ms: int
    rejoin_wait_s: float


class _Session:
    """One stereo Transcribe stream of a call and the (up to two) handles on it.

    Every method runs under the call's lock.
    """

    def __init__(
        self,
        engine: TranscribeEngine,
        contact_id: str,
        language: str,
        tuning: _Tuning,
        expected: frozenset[int],
        wait_until: float,
    ) -> None:
        self._engine = engine
        self._contact_id = contact_id
        self._language = language
        self.mux = StereoMux(tuning.max_lag_ms)
        self.expected = expected  # channels whose tracks are reopening after a failure
        self.wait_until = wait_until
        self.handles: dict[int, StereoHandle] = {}
        self.pending: dict[int, bytearray] = {}
        self.stream: TranscribeStream | None = None
        self.state = _State.PENDING

    @property
    def failure(self) -> SpeechEngineError | None:
        return self.stream.failure if self.stream is not None else None

    @property
    def takes_audio(self) -> bool:
        return self.state in (_State.PENDING, _State.RUNNING)

    def joinable(self, channel: int) -> bool:
        return self.takes_audio and channel not in self.handles

    def attach(self, handle: StereoHandle) -> None:
        self.handles[handle.channel] = handle
        if self.state is _State.PENDING:
            self.pending[handle.channel] = bytearray()
        else:
            handle.clock = self.mux.attach(handle.channel)

    def push(self, channel: int, pcm: bytes) -> None:
        if self.state is _State.PENDING:
            self.pending[channel] += pcm
        else:
            self.mux.push(channel, pcm)

    def pump(self, now: float, *, polling: bool) -> None:
        """Start when ready, send the frames that are ready, route results.

        A stream that waits for a track to rejoin starts only from a poll: the
        core writes a reopened track's resend in several sends right after
        opening it, and both resends must be in to align them.
        """
        ready = polling or not self.expected
        if self.state is _State.PENDING and ready and self._ready(now):
            self._start()
        if self.state is _State.RUNNING and self.stream is not None:
            frames = self.mux.take()
            if frames:
                self.stream.send(frames)
        self._route()

    def end(self, channel: int) -> None:
        """A handle closed: flush everything, padded, and end the stream's audio."""
        if self.state is _State.PENDING:
            self._start()
        if self.state is not _State.RUNNING or self.stream is None:
            return
        self.mux.finish(channel)
        self.stream.send(self.mux.flush())
        self._route()  # results so far belong before the end
        self.stream.end_audio()
        self.state = _State.ENDING
        _log.info(
            "stereo stream ending: %d ms sent, padding %s ms",
            self.mux.sent_samples // _SAMPLES_PER_MS,
            [p // _SAMPLES_PER_MS for p in self.mux.padded_samples],
            extra={"contact_id": self._contact_id, "track": "stereo"},
        )

    def _ready(self, now: float) -> bool:
        if any(handle.closing for handle in self.handles.values()):
            return True
        return self.expected <= self.handles.keys() or now >= self.wait_until

    def _start(self) -> None:
        self.stream = self._engine.open_stream(
            contact_id=self._contact_id, track="stereo", language=self._language, channels=2
        )
        self.state = _State.RUNNING
        # Resends after a failure end at the live edge: align their ends, not starts.
        # A track with nothing queued yet starts with the others (the lag rule pads it).
        longest = max((len(p) for p in self.pending.values()), default=0)
        for channel, pcm in self.pending.items():
            lead_in = (longest - len(pcm)) // BYTES_PER_SAMPLE if pcm else 0
            self.handles[channel].clock = self.mux.attach(channel, lead_in)
            self.mux.push(channel, bytes(pcm))
        self.pending.clear()
        missing = sorted(self.expected - self.handles.keys())
        _log.info(
            "stereo stream started on channels %s%s",
            sorted(self.handles),
            f"; channel {missing} did not rejoin in time" if missing else "",
            extra={"contact_id": self._contact_id, "track": "stereo"},
        )

    def _route(self) -> None:
        if self.stream is None:
            return
        finished = self.stream.finished  # before taking: no result can come after
        for channel, hypothesis in self.stream.take_results():
            handle = self.handles.get(channel)
            if handle is not None:
                handle.receive(hypothesis, after_end=self.state is _State.ENDING)
        if finished:
            self.state = _State.OVER


class StereoHandle:
    """One track's `RecognitionStream` onto its call's stereo stream.

    Times are the handle's own: milliseconds of audio sent through this handle.
    """

    def __init__(self, call: _StereoCall, session: _Session, channel: int) -> None:
        self._call = call
        self.session = session
        self.channel = channel
        self.clock: ChannelClock | None = None
        self.closing = False
        self._ready: list[Hypothesis] = []
        self._after_end: list[Hypothesis] = []  # only a close() of this handle takes these
        self._abandoned = False  # audio came after the other track ended the stream

    def send(self, pcm: bytes) -> None:
        """Queue 8 kHz s16le mono PCM for this track's channel."""
        with self._call.lock:
            if self.closing:
                raise RuntimeError("send() after close() on a stereo Transcribe handle")
            session = self.session
            if session.takes_audio:
                session.push(self.channel, pcm)
                session.pump(self._call.now(), polling=False)
            elif session.failure is None:
                self._abandoned = True  # its results after the end are incomplete

    def poll(self) -> list[Hypothesis]:
        """This channel's hypotheses so far; then the stream's error, if it ended."""
        with self._call.lock:
            self.session.pump(self._call.now(), polling=True)
            ready, self._ready = self._ready, []
            if ready:
                return ready
            error = self._error(())
            if error is not None:
                raise error
            return []

    def close(self) -> list[Hypothesis]:
        """End the stream's audio (both channels) and return this channel's last results."""
        with self._call.lock:
            if not self.closing:
                self.closing = True
                self.session.end(self.channel)
            stream = self.session.stream
        if stream is not None:
            stream.wait_finished()  # bounded by the engine's close timeout
        with self._call.lock:
            self.session.pump(self._call.now(), polling=True)
            if not self._abandoned:
                self._ready.extend(self._after_end)
            hypotheses, self._ready, self._after_end = self._ready, [], []
            error = self._error(tuple(hypotheses))
            if error is not None:
                raise error
            return hypotheses

    def receive(self, hypothesis: Hypothesis, *, after_end: bool) -> None:
        """A result for this channel, in stream time; kept in handle time."""
        mapped = self._to_handle_time(hypothesis)
        if mapped is None:
            return
        if after_end and not self.closing:
            self._after_end.append(mapped)
        else:
            self._ready.append(mapped)

    def _error(self, hypotheses: tuple[Hypothesis, ...]) -> SpeechEngineError | None:
        session = self.session
        failure = session.failure
        if failure is not None:
            return type(failure)(str(failure), code=failure.code, hypotheses=hypotheses)
        if self._abandoned and session.state is _State.OVER:
            self._after_end.clear()
            return RetryableSpeechError(
                "the call's stereo Transcribe stream ended when the other track closed; "
                "this track's audio since its last final goes to a new stream",
                code="StereoStreamEnded",
                hypotheses=hypotheses,
            )
        return None

    def _to_handle_time(self, hypothesis: Hypothesis) -> Hypothesis | None:
        if self.clock is None:
            return None
        span = self.clock.span(hypothesis.start_ms, hypothesis.end_ms)
        if span is None:
            return None  # padding only
        words = []
        for word in hypothesis.words:
            word_span = self.clock.span(word.start_ms, word.end_ms)
            if word_span is not None:
                words.append(Word(word.text, *word_span, word.confidence))
        return dataclasses.replace(hypothesis, start_ms=span[0], end_ms=span[1], words=tuple(words))


class _StereoCall:
    """A call's current stereo session and the latest handle of each track."""

    def __init__(
        self,
        engine: TranscribeEngine,
        contact_id: str,
        tuning: _Tuning,
        now: Callable[[], float],
    ) -> None:
        self.lock = threading.Lock()
        self._engine = engine
        self._contact_id = contact_id
        self._tuning = tuning
        self._clock = now
        self.touched = now()
        self.current: _Session | None = None
        self.latest: dict[int, StereoHandle] = {}

    def now(self) -> float:
        self.touched = self._clock()
        return self.touched

    def idle_since(self) -> float | None:
        """When this call was last used, if its stream is over; else None."""
        with self.lock:
            if self.current is not None and self.current.state is not _State.OVER:
                return None
            return self.touched

    def open(self, channel: int, language: str) -> StereoHandle:
        with self.lock:
            now = self.now()
            session = self.current
            if session is None or not session.joinable(channel):
                session = self._new_session(channel, language, now)
            handle = StereoHandle(self, session, channel)
            session.attach(handle)
            self.latest[channel] = handle
            return handle

    def _new_session(self, channel: int, language: str, now: float) -> _Session:
        other = self.latest.get(1 - channel)
        # The other track was live on the stream that just ended (or its close failed
        # with it): the core is about to reopen it. One that did not rejoin an earlier
        # session is not waited for.
        rejoining = (
            other is not None
            and other.session is self.current
            and not other.session.takes_audio
            and (not other.closing or other.session.failure is not None)
        )
        expected = frozenset({1 - channel}) if rejoining else frozenset()
        session = _Session(
            self._engine,
            self._contact_id,
            language,
            self._tuning,
            expected,
            now + self._tuning.rejoin_wait_s,
        )
        self.current = session
        return session


class StereoTranscribeEngine:
    """Amazon Transcribe as a `SpeechEngine` with one stereo stream per call.

    Wraps a `TranscribeEngine` (its client, event loop and request options).
    `max_lag_ms`: how far one track's audio may run ahead of the other's before
    the other is padded with silence. `rejoin_wait_s`: how long a new stream
    after a failure waits for the call's other track to reopen.
    """

    name = "transcribe"

    def __init__(
        self,
        engine: TranscribeEngine,
        *,
        max_lag_ms: int = 1000,
        rejoin_wait_s: float = 30.0,
        forget_after_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_lag_ms < 0 or rejoin_wait_s < 0:
            raise ValueError("max_lag_ms and rejoin_wait_s must not be negative")
        self._engine = engine
        self._tuning = _Tuning(max_lag_ms, rejoin_wait_s)
        self._forget_after_s = forget_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, _StereoCall] = {}

    def open_stream(self, *, contact_id: str, track: str, language: str) -> StereoHandle:
        """A handle for one track onto the call's stereo stream (joined or started)."""
        channel = TRACK_CHANNELS.get(track)
        if channel is None:
            raise ValueError(f"a stereo stream carries {sorted(TRACK_CHANNELS)}, not {track!r}")
        with self._lock:
            self._forget_idle_calls()
            call = self._calls.get(contact_id)
            if call is None:
                call = _StereoCall(self._engine, contact_id, self._tuning, self._clock)
                self._calls[contact_id] = call
        return call.open(channel, language)

    def _forget_idle_calls(self) -> None:
        # A call is kept after its stream ends so a reopening track finds its partner.
        horizon = self._clock() - self._forget_after_s
        for contact_id, call in list(self._calls.items()):
            since = call.idle_since()
            if since is not None and since < horizon:
                del self._calls[contact_id]

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel every stream and stop the wrapped engine's event loop."""
        self._engine.close(timeout_s)

    def __enter__(self) -> StereoTranscribeEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
