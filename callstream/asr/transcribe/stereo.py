"""Amazon Transcribe with one stereo stream per call instead of one stream per track.

`StereoTranscribeEngine` is a `SpeechEngine` like `TranscribeEngine`, and the
transcriber core drives it the same way: one `RecognitionStream` per track.
Here each is a `StereoHandle` onto its call's shared `_Session`, which carries
both tracks in one Transcribe stream with channel identification: channel 0 is
AUDIO_FROM_CUSTOMER, channel 1 AUDIO_TO_CUSTOMER. This halves the streams a
call holds against the account's concurrent-stream quota.

- Interleaving (`StereoMux`, in `mux.py`): a frame goes out once both channels have its
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

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from callstream.asr.port import (
    Hypothesis,
    RetryableSpeechError,
    SpeechEngineError,
    Word,
)
from callstream.asr.transcribe.engine import TranscribeEngine, TranscribeStream
from callstream.asr.transcribe.mux import ChannelClock, StereoMux
from callstream.audio import BYTES_PER_SAMPLE, SAMPLES_PER_MS

_log = logging.getLogger(__name__)

TRACK_CHANNELS = {"AUDIO_FROM_CUSTOMER": 0, "AUDIO_TO_CUSTOMER": 1}


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
            self.mux.sent_samples // SAMPLES_PER_MS,
            [p // SAMPLES_PER_MS for p in self.mux.padded_samples],
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
