"""The transcriber core's recovery: retries with resend, keep-alive silence, rollover.

`BurstEngine` is a TEST DOUBLE, not a recogniser: a "word" is a run of one
constant non-zero sample value (value v reads as "wv"), silence is zeros. It
emits a partial while a run is open and a final when it ends, fails streams on
cue, and, like Amazon Transcribe, fails a stream that hears no audio for 15 s
of the test clock. Everything runs on a fake clock passed to `poll(now)`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from callstream.asr.port import FatalSpeechError, Hypothesis, RetryableSpeechError, Word
from callstream.audio import BYTES_PER_MS
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    EndReason,
    Event,
    Track,
    TranscriptSegmentProduced,
)
from services.transcriber.core import CallTranscription
from services.transcriber.recovery import AudioSpool, RecoveryPolicy, StreamClock

C = "contact-r"
T = Track.FROM_CUSTOMER


@dataclass
class Clock:
    now: float = 0.0


@dataclass
class Failure:
    """Fail stream number `stream` (0-based) after it has heard `after_ms` of audio."""

    stream: int
    after_ms: int
    error: type[Exception] = RetryableSpeechError
    at_close: bool = False


@dataclass
class BurstStream:
    clock: Clock
    fail_after_ms: int | None = None
    fail_at_close: bool = False
    error: type[Exception] = RetryableSpeechError
    heard_ms: int = 0
    silence_sent_ms: int = 0
    last_audio_at: float = 0.0
    run_value: int = 0
    run_start: int = 0
    ready: list[Hypothesis] = field(default_factory=list)
    failed: Exception | None = None

    def send(self, pcm: bytes) -> None:
        if self.failed is not None:
            return
        if self.clock.now - self.last_audio_at >= 15.0:
            self.failed = RetryableSpeechError("no new audio was received for 15 seconds")
            return
        self.last_audio_at = self.clock.now
        values = np.frombuffer(pcm, "<i2")[:: BYTES_PER_MS // 2]
        if not values.any():
            self.silence_sent_ms += len(values)
        self._scan(values)
        if self.fail_after_ms is not None and self.heard_ms >= self.fail_after_ms:
            self.failed = self.error(f"injected after {self.heard_ms} ms")

    def _scan(self, values: np.ndarray) -> None:
        edges = np.flatnonzero(np.diff(np.concatenate([[self.run_value], values])))
        for at in edges:
            if self.run_value:
                self._emit(self.heard_ms + int(at), partial=False)
            self.run_value, self.run_start = int(values[at]), self.heard_ms + int(at)
        self.heard_ms += len(values)
        if self.run_value:
            self._emit(self.heard_ms, partial=True)

    def _emit(self, end: int, *, partial: bool) -> None:
        text = f"w{self.run_value}"
        rid = f"r{self.run_start}"
        word = Word(text, self.run_start, end, 0.9)
        self.ready.append(Hypothesis(rid, self.run_start, end, text, partial, (word,)))

    def poll(self) -> list[Hypothesis]:
        out, self.ready = self.ready, []
        if self.failed is not None:
            error = self.failed
            raise type(error)(str(error), hypotheses=tuple(out))
        return out

    def close(self) -> list[Hypothesis]:
        if self.fail_at_close:
            self.failed = self.error("injected at close")
        if self.run_value and self.failed is None:
            self._emit(self.heard_ms, partial=False)
            self.run_value = 0
        return self.poll()


class BurstEngine:
    name = "burst-test-double"

    def __init__(self, clock: Clock, failures: Sequence[Failure] = ()) -> None:
        self.clock = clock
        self.failures = {f.stream: f for f in failures}
        self.streams: list[BurstStream] = []

    def open_stream(self, *, contact_id: str, track: str, language: str) -> BurstStream:
        failure = self.failures.get(len(self.streams))
        stream = BurstStream(self.clock, last_audio_at=self.clock.now)
        if failure is not None:
            stream.fail_after_ms = None if failure.at_close else failure.after_ms
            stream.fail_at_close, stream.error = failure.at_close, failure.error
        self.streams.append(stream)
        return stream


# --- a call -----------------------------------------------------------------------


def speech(words: int, period_ms: int = 5000, word_ms: int = 2000, lead_ms: int = 1000) -> bytes:
    """`words` periods, each silence with one word of `word_ms` after `lead_ms`."""
    values = np.zeros(words * period_ms, np.int16)
    for k in range(words):
        values[k * period_ms + lead_ms : k * period_ms + lead_ms + word_ms] = k + 1
    return np.repeat(values, BYTES_PER_MS // 2).tobytes()


def truth(
    words: int, period_ms: int = 5000, word_ms: int = 2000, lead_ms: int = 1000
) -> list[tuple[str, int, int]]:
    return [
        (f"w{k + 1}", k * period_ms + lead_ms, k * period_ms + lead_ms + word_ms)
        for k in range(words)
    ]


def chunks(
    pcm: bytes, chunk_ms: int, first_seq: int = 0, first_ms: int = 0
) -> Iterator[AudioChunkCaptured]:
    size = chunk_ms * BYTES_PER_MS
    for n, at in enumerate(range(0, len(pcm), size)):
        offset_ms = first_ms + at // BYTES_PER_MS
        yield AudioChunkCaptured(
            C,
            T,
            first_seq + n,
            offset_ms * 8,
            offset_ms,
            1_700_000_000_000 + offset_ms,
            pcm[at : at + size],
            "1",
        )


def ended(count: int) -> CallEnded:
    return CallEnded(
        C, EndReason.END_OF_STREAM, 0, chunk_counts={T.value: count}, call_start_time_ms=0
    )


def run_call(
    call: CallTranscription, clock: Clock, pcm: bytes, chunk_ms: int = 128, pace: float = 1.0
) -> list[Event]:
    """Feed the call at `pace` x its length in clock time, polling after each chunk."""
    out: list[Event] = []
    n = 0
    for chunk in chunks(pcm, chunk_ms):
        clock.now += chunk_ms / 1000 * pace
        out += call.accept(chunk, clock.now)
        out += call.poll(clock.now)
        n += 1
    return out + finish(call, clock, n)


def finish(call: CallTranscription, clock: Clock, count: int) -> list[Event]:
    out = call.accept(ended(count), clock.now)
    for _ in range(200):
        if call.done:
            return out
        clock.now += 0.5
        out += call.poll(clock.now)
    raise AssertionError("the call never finished")


def finals(events: list[Event]) -> list[tuple[str, int, int]]:
    return [
        (e.transcript, e.start_ms, e.end_ms)
        for e in events
        if isinstance(e, TranscriptSegmentProduced) and not e.is_partial
    ]


def final_ids(events: list[Event]) -> list[str]:
    return [
        e.segment_id
        for e in events
        if isinstance(e, TranscriptSegmentProduced) and not e.is_partial
    ]


POLICY = RecoveryPolicy(backoff_base_s=0.2, backoff_max_s=2.0)


# --- retries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failures",
    [
        pytest.param([Failure(0, 2500)], id="mid-word"),
        pytest.param([Failure(0, 4000)], id="right-after-a-final"),
        pytest.param([Failure(0, 7000), Failure(1, 100), Failure(2, 50)], id="repeated-failures"),
        pytest.param([Failure(0, 0, at_close=True)], id="at-close"),
        pytest.param([Failure(0, 11_000), Failure(1, 0, at_close=True)], id="then-at-close"),
    ],
)
def test_every_word_is_transcribed_once_with_call_times_after_retryable_failures(
    failures: list[Failure],
) -> None:
    clock = Clock()
    engine = BurstEngine(clock, failures)
    call = CallTranscription(C, engine, policy=POLICY, unit_random=lambda: 0.5)
    out = run_call(call, clock, speech(4))
    assert finals(out) == truth(4)
    assert len(set(final_ids(out))) == 4
    assert len(engine.streams) == len(failures) + 1
    assert isinstance(out[-1], CallEnded)


def test_partials_and_the_final_of_a_word_cut_by_a_failure_share_one_segment_id() -> None:
    clock = Clock()
    call = CallTranscription(C, BurstEngine(clock, [Failure(0, 2500)]), policy=POLICY)
    out = run_call(call, clock, speech(1))
    segments = [e for e in out if isinstance(e, TranscriptSegmentProduced)]
    assert {s.segment_id for s in segments} == {f"{C}:{T.value}:1000"}
    assert [s.is_partial for s in segments][-1] is False


def test_retries_back_off_exponentially_and_never_before_they_are_due() -> None:
    clock = Clock()
    failures = [Failure(k, 10) for k in range(3)]
    engine = BurstEngine(clock, failures)
    policy = RecoveryPolicy(backoff_base_s=1.0, backoff_max_s=60.0)
    call = CallTranscription(C, engine, policy=policy, unit_random=lambda: 0.0)
    (chunk,) = chunks(speech(1)[: 16 * 128], 128)
    call.accept(chunk, 0.0)
    opened_at = []
    for tick in range(1, 200):
        clock.now = tick * 0.1
        before = len(engine.streams)
        call.poll(clock.now)
        if len(engine.streams) > before:
            opened_at.append(round(clock.now, 1))
    # Failures show at the next poll (0.0, 0.6, 1.7); the waits are half of
    # 1, 2, 4 s ("equal jitter" with its random part at 0).
    assert opened_at == [0.5, 1.6, 3.7]


def test_backoff_is_capped_and_jittered_within_half_to_all_of_the_cap() -> None:
    policy = RecoveryPolicy(backoff_base_s=0.5, backoff_max_s=4.0)
    assert policy.backoff_s(1, 0.0) == 0.25 and policy.backoff_s(1, 0.999) < 0.5
    assert policy.backoff_s(10, 0.0) == 2.0 and policy.backoff_s(10, 0.999) < 4.0


def test_a_fatal_error_stops_the_track_but_the_call_still_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    engine = BurstEngine(clock, [Failure(0, 6000, error=FatalSpeechError)])
    call = CallTranscription(C, engine, policy=POLICY)
    with caplog.at_level(logging.ERROR):
        out = run_call(call, clock, speech(3))
    assert finals(out) == truth(1) and isinstance(out[-1], CallEnded)
    assert "transcription of this track stopped" in caplog.text
    assert len(engine.streams) == 1


def test_a_track_is_given_up_after_max_retries_new_streams() -> None:
    clock = Clock()
    engine = BurstEngine(clock, [Failure(k, 10) for k in range(10)])
    policy = RecoveryPolicy(max_retries=3, backoff_base_s=0.1, backoff_max_s=0.1)
    out = run_call(CallTranscription(C, engine, policy=policy), clock, speech(2))
    assert len(engine.streams) == 4 and isinstance(out[-1], CallEnded)


# --- silence and keep-alive ----------------------------------------------------------


def test_thirty_seconds_without_audio_keep_the_stream_alive_and_speech_after_is_transcribed() -> (
    None
):
    clock = Clock()
    engine = BurstEngine(clock)
    call = CallTranscription(C, engine, policy=POLICY)
    first, second = speech(2), speech(2)
    out: list[Event] = []
    seq = 0
    for chunk in chunks(first, 128):
        clock.now += 0.128
        out += call.accept(chunk, clock.now) + call.poll(clock.now)
        seq += 1
    for _ in range(300):  # 30 s with no chunk at all (hold, or a stalled producer)
        clock.now += 0.1
        out += call.poll(clock.now)
    for chunk in chunks(second, 128, first_seq=seq, first_ms=10_000):
        clock.now += 0.128
        out += call.accept(chunk, clock.now) + call.poll(clock.now)
        seq += 1
    out += finish(call, clock, seq)
    later = [(w, s + 10_000, e + 10_000) for w, s, e in truth(2)]
    assert finals(out) == truth(2) + later  # filler silence maps to no call time
    assert len(engine.streams) == 1 and engine.streams[0].silence_sent_ms >= 5000


def test_thirty_seconds_of_silent_audio_in_the_middle_give_no_segment() -> None:
    clock = Clock()
    pcm = speech(2) + bytes(30_000 * BYTES_PER_MS) + speech(2)
    out = run_call(CallTranscription(C, BurstEngine(clock), policy=POLICY), clock, pcm)
    later = [(w, s + 40_000, e + 40_000) for w, s, e in truth(2)]
    assert finals(out) == truth(2) + later


def test_without_keep_alive_an_idle_stream_times_out_and_is_replaced_without_loss() -> None:
    clock = Clock()
    engine = BurstEngine(clock)
    policy = RecoveryPolicy(keepalive_after_s=20.0, backoff_base_s=0.1, backoff_max_s=0.1)
    call = CallTranscription(C, engine, policy=policy)
    out: list[Event] = []
    pcm = speech(2)
    cut = 7000 * BYTES_PER_MS  # mid-word: the second word straddles the gap
    parts = list(chunks(pcm[:cut], 100)) + list(chunks(pcm[cut:], 100, first_seq=70, first_ms=7000))
    for n, chunk in enumerate(parts):
        clock.now += 20.0 if n == 70 else 0.1
        out += call.accept(chunk, clock.now) + call.poll(clock.now)
    out += finish(call, clock, len(parts))
    assert finals(out) == truth(2) and len(engine.streams) == 2


# --- long calls --------------------------------------------------------------------


def test_two_hour_call_crosses_forced_rollovers_and_a_failure_with_no_gap_in_segment_times() -> (
    None
):
    clock = Clock()
    engine = BurstEngine(clock, [Failure(2, 1_234_567)])  # the third stream also fails
    policy = RecoveryPolicy(rollover_ms=30 * 60_000, backoff_base_s=0.2, backoff_max_s=0.2)
    call = CallTranscription(C, engine, policy=policy)
    words = 2 * 3600 // 5
    out = run_call(call, clock, speech(words), chunk_ms=1000, pace=0.01)
    assert finals(out) == truth(words)  # every word once, at its true call time
    assert len(engine.streams) >= 5  # 4 rollovers in 2 h, plus the retry
    assert max(s.heard_ms for s in engine.streams) <= 30 * 60_000 + policy.rollover_grace_ms


# --- the pieces ---------------------------------------------------------------------


def test_spool_keeps_audio_since_the_last_final_and_drops_the_oldest_past_its_limit() -> None:
    spool = AudioSpool(limit_ms=1000)
    assert spool.add(0, bytes(600 * BYTES_PER_MS)) == 0
    assert spool.add(600, bytes(600 * BYTES_PER_MS)) == 600
    assert spool.pieces()[0][0] == 600 and spool.ms == 600 and spool.dropped_ms == 600
    spool.release_before(900)
    assert [(ms, len(p) // BYTES_PER_MS) for ms, p in spool.pieces()] == [(900, 300)]


def test_stream_clock_maps_filler_silence_to_no_call_time() -> None:
    clock = StreamClock()
    clock.audio(0, 1000)
    clock.silence(5000)
    clock.audio(1000, 1000)
    assert clock.span(200, 800) == (200, 800)
    assert clock.span(1500, 5500) is None
    assert clock.span(900, 6200) == (900, 1200)
    assert clock.span(5900, 6500) == (1000, 1500)


def test_past_the_resend_limit_the_oldest_audio_is_not_resent_and_this_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    engine = BurstEngine(clock, [Failure(0, 25_000)])
    policy = RecoveryPolicy(resend_limit_ms=10_000, backoff_base_s=0.1, backoff_max_s=0.1)
    call = CallTranscription(C, engine, policy=policy)
    with caplog.at_level(logging.WARNING):
        out = run_call(call, clock, speech(1, period_ms=40_000, word_ms=30_000))
    assert len([r for r in caplog.records if "resend buffer full" in r.message]) == 1
    # The stream failed 25 s in: only its last 10 s were resent, so the word's
    # first 15 s are lost and its final starts after them.
    assert engine.streams[1].heard_ms < 40_000 - 15_000
    ((text, start, end),) = finals(out)
    assert (text, end) == ("w1", 31_000) and 15_000 <= start <= 16_000
