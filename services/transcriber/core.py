"""Transcriber core: a call's audio events in, transcript segments out.

Per call and track, chunks are put back in sequence order (duplicates
dropped), fed to a speech-engine stream, and the engine's hypotheses become
`TranscriptSegmentProduced` with call-relative times. A result keeps the start
time of its first hypothesis, so its partials and its final share one
`segment_id` (derived from contact, track and start): a replay of the same
audio yields the same ids. When the call's CallEnded has arrived and every
chunk it counted has been fed, the streams are closed, the last finals
emitted, and the CallEnded is forwarded to the transcripts stream.

Recovery: each track keeps the audio it sent since its last final
(`recovery.AudioSpool`). When a stream fails with a `RetryableSpeechError`, the
track backs off (exponential, jittered), opens a new stream and resends that
audio; the new stream's times are mapped back to call time, and a final is
never emitted twice. Without audio for a while the stream gets keep-alive
silence, which maps to no call time, so nothing is transcribed from it. A
stream that has carried `rollover_ms` of audio is closed and replaced the
same way. Time comes in through `poll(now)`; the core never reads a clock.

Resuming on another instance: `progress()` is the call's state as plain data
(language, whether transcription is on, and per track the end of the last
final and the sequence of the first chunk not wholly covered by finals);
`restore(state)` continues from it: chunks before that sequence are dropped,
the audio before the last final's end is cut off, and the engine restarts
there, as after a stream failure.

No AWS, no environment: the engine is a port handed in.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from callstream.asr.port import (
    FatalSpeechError,
    Hypothesis,
    RecognitionStream,
    RetryableSpeechError,
    SpeechEngine,
    SpeechEngineError,
)
from callstream.audio import BYTES_PER_MS
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    Event,
    Track,
    TranscriptSegmentProduced,
    WordTiming,
)
from services.transcriber.recovery import (
    AudioSpool,
    RecoveryPolicy,
    StreamClock,
)

log = logging.getLogger(__name__)
_ORPHAN_TOLERANCE_MS = 400  # a retried result this close to an orphaned partial takes its id


@dataclass
class _TrackFeed:
    """Ordering, engine and recovery state of one track."""

    track: Track
    spool: AudioSpool
    next_sequence: int = 0
    waiting: dict[int, AudioChunkCaptured] = field(default_factory=dict)
    stream: RecognitionStream | None = None
    clock: StreamClock = field(default_factory=StreamClock)
    starts: dict[str, int] = field(default_factory=dict)  # result id -> pinned start
    last_partial: dict[str, str] = field(default_factory=dict)
    orphans: list[int] = field(default_factory=list)  # starts of partials a failed stream left
    committed_ms: int = 0  # call time up to which finals were emitted
    last_final_start: int = -1
    audio_at: float | None = None  # when audio (or keep-alive) last went to the stream
    attempts: int = 0  # consecutive failed streams
    retry_at: float | None = None
    closed: bool = False
    failed: bool = False
    streams_opened: int = 0
    spool_full_logged: bool = False
    sent: deque[tuple[int, int]] = field(default_factory=deque)  # (sequence, end ms) since final


class CallTranscription:
    """One call's transcription state machine."""

    def __init__(
        self,
        contact_id: str,
        engine: SpeechEngine,
        default_language: str = "en-US",
        policy: RecoveryPolicy | None = None,
        unit_random: Callable[[], float] = random.random,
    ) -> None:
        self.contact_id = contact_id
        self.engine = engine
        self.language = default_language
        self.policy = policy or RecoveryPolicy()
        self.unit_random = unit_random
        self.enabled = True
        self.call_start_time_ms: int | None = None
        self.feeds: dict[Track, _TrackFeed] = {}
        self.ended: CallEnded | None = None
        self.done = False
        self.now: float | None = None

    def accept(self, event: Event, now: float | None = None) -> list[Event]:
        """Take one event of this call; return segments (and CallEnded) now ready."""
        if self.done:
            return []
        self._tick(now)
        if isinstance(event, CallStarted):
            self.enabled = event.transcription_enabled
            self.language = event.language_code or self.language
        elif isinstance(event, AudioChunkCaptured):
            self._queue(event)
        elif isinstance(event, CallEnded):
            self.ended = event
        return self.poll()

    def poll(self, now: float | None = None) -> list[Event]:
        """Results the engines have ready, retries and keep-alives that are due;
        finishes the call once all audio is in."""
        if self.done:
            return []
        self._tick(now)
        out: list[Event] = []
        for feed in self.feeds.values():
            out.extend(self._service(feed))
        if self._all_audio_in():
            out.extend(self._finish())
        return out

    def _tick(self, now: float | None) -> None:
        if now is not None:
            self.now = now

    def _due(self, at: float | None) -> bool:
        return at is None or self.now is None or self.now >= at

    # --- audio in ---------------------------------------------------------------

    def _queue(self, chunk: AudioChunkCaptured) -> None:
        feed = self.feeds.get(chunk.track)
        if feed is None:
            feed = _TrackFeed(chunk.track, AudioSpool(self.policy.resend_limit_ms))
            self.feeds[chunk.track] = feed
        if chunk.sequence < feed.next_sequence or chunk.sequence in feed.waiting:
            return  # a replayed or duplicated chunk
        if self.call_start_time_ms is None and chunk.sample_offset == 0:
            self.call_start_time_ms = chunk.start_time_ms
        feed.waiting[chunk.sequence] = chunk
        while feed.next_sequence in feed.waiting:
            ready = feed.waiting.pop(feed.next_sequence)
            feed.next_sequence += 1
            if self.enabled and not feed.failed:
                self._send(feed, ready)

    def _send(self, feed: _TrackFeed, chunk: AudioChunkCaptured) -> None:
        feed.sent.append((chunk.sequence, chunk.offset_ms + len(chunk.pcm) // BYTES_PER_MS))
        dropped = feed.spool.add(chunk.offset_ms, chunk.pcm)
        feed.spool.release_before(feed.committed_ms)  # a restored track resumes mid-chunk
        if dropped:  # a resume could not hear those chunks again either
            first_ms = feed.spool.pieces()[0][0]
            while feed.sent and feed.sent[0][1] <= first_ms:
                feed.sent.popleft()
        if dropped and not feed.spool_full_logged:
            # Once until the next final: a long silent stretch fills it chunk by chunk.
            feed.spool_full_logged = True
            log.warning(
                "resend buffer full (%d ms without a final): older audio can no longer be "
                "resent after a failure",
                feed.spool.ms,
                extra=self._extra(feed),
            )
        if feed.stream is None and feed.retry_at is None and not feed.closed:
            self._open(feed)  # the first stream; it hears the spool, this chunk included
        elif feed.stream is not None:
            self._write(feed, chunk.offset_ms, chunk.pcm)

    def _write(self, feed: _TrackFeed, call_ms: int, pcm: bytes) -> None:
        assert feed.stream is not None
        feed.stream.send(pcm)
        feed.clock.audio(call_ms, len(pcm) // BYTES_PER_MS)
        feed.audio_at = self.now

    def _open(self, feed: _TrackFeed) -> None:
        """A new stream for the track, fed everything since the last final."""
        try:
            feed.stream = self.engine.open_stream(
                contact_id=self.contact_id, track=feed.track.value, language=self.language
            )
        except (ValueError, FatalSpeechError) as error:
            self._give_up(feed, error)
            return
        feed.streams_opened += 1
        feed.retry_at = None
        feed.clock = StreamClock()
        feed.orphans = sorted({*feed.orphans, *feed.starts.values()})
        feed.starts.clear()
        feed.last_partial.clear()
        for call_ms, pcm in feed.spool.pieces():
            self._write(feed, call_ms, pcm)

    # --- progress, for a resume elsewhere -------------------------------------------

    def progress(self) -> dict[str, Any]:
        """What another instance needs to go on from the last finals (plain data)."""
        return {
            "language": self.language,
            "enabled": self.enabled,
            "call_start_time_ms": self.call_start_time_ms,
            "done": self.done,
            "tracks": {
                feed.track.value: {
                    "committed_ms": feed.committed_ms,
                    "last_final_start": feed.last_final_start,
                    "resume_sequence": feed.sent[0][0] if feed.sent else feed.next_sequence,
                }
                for feed in self.feeds.values()
            },
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `progress()` saved by another instance."""
        self.language = state["language"]
        self.enabled = state["enabled"]
        self.call_start_time_ms = state["call_start_time_ms"]
        for name, saved in state["tracks"].items():
            feed = _TrackFeed(Track(name), AudioSpool(self.policy.resend_limit_ms))
            feed.committed_ms = saved["committed_ms"]
            feed.last_final_start = saved["last_final_start"]
            feed.next_sequence = saved["resume_sequence"]
            self.feeds[feed.track] = feed
        log.info(
            "resuming after the last finals: %s"
            if self.enabled
            else "resuming (%s): not transcribed",
            {name: t["committed_ms"] for name, t in state["tracks"].items()},
            extra={"contact_id": self.contact_id},
        )

    # --- engine results, failures, keep-alive and rollover ----------------------------

    def _service(self, feed: _TrackFeed) -> list[Event]:
        if feed.stream is None:
            if feed.retry_at is not None and self._due(feed.retry_at):
                self._open(feed)
            return []
        try:
            hypotheses = feed.stream.poll()
        except SpeechEngineError as error:
            return self._on_failure(feed, error)
        if hypotheses:
            feed.attempts = 0
        out = self._segments(feed, hypotheses)
        self._keep_alive(feed)
        if self._rollover_due(feed):
            out.extend(self._roll_over(feed))
        return out

    def _on_failure(self, feed: _TrackFeed, error: SpeechEngineError) -> list[Event]:
        """Emit what the stream still delivered, then retry later or give up."""
        out = self._segments(feed, list(error.hypotheses))
        feed.stream = None
        feed.attempts += 1
        if not isinstance(error, RetryableSpeechError) or feed.attempts > self.policy.max_retries:
            self._give_up(feed, error)
            return out
        delay = self.policy.backoff_s(feed.attempts, self.unit_random())
        feed.retry_at = (self.now or 0.0) + delay
        log.warning(
            "speech stream failed (%s); retry %d in %.2f s, resending %d ms",
            error,
            feed.attempts,
            delay,
            feed.spool.ms,
            extra=self._extra(feed),
        )
        return out

    def _give_up(self, feed: _TrackFeed, error: Exception) -> None:
        log.error(
            "transcription of this track stopped after %d attempt(s): %s; %d ms untranscribed",
            max(1, feed.attempts),
            error,
            feed.spool.ms,
            extra=self._extra(feed),
        )
        feed.failed, feed.stream, feed.retry_at = True, None, None
        feed.spool.clear()

    def _keep_alive(self, feed: _TrackFeed) -> None:
        after = self.policy.keepalive_after_s
        if self.now is None or feed.stream is None or after is None:
            return
        if feed.audio_at is None or self.now - feed.audio_at < after:
            return
        feed.stream.send(bytes(self.policy.keepalive_ms * BYTES_PER_MS))
        feed.clock.silence(self.policy.keepalive_ms)
        feed.audio_at = self.now

    def _rollover_due(self, feed: _TrackFeed) -> bool:
        sent = feed.clock.sent_ms
        if sent < self.policy.rollover_ms:
            return False
        return not feed.starts or sent >= self.policy.rollover_ms + self.policy.rollover_grace_ms

    def _roll_over(self, feed: _TrackFeed) -> list[Event]:
        """Close a long stream and carry on in a new one; the audio since its last
        final is heard again by the new stream."""
        log.info("rolling over a stream after %d ms", feed.clock.sent_ms, extra=self._extra(feed))
        out = self._close_stream(feed)
        if feed.stream is None and feed.retry_at is None and not feed.failed:
            self._open(feed)
        return out

    def _close_stream(self, feed: _TrackFeed) -> list[Event]:
        assert feed.stream is not None
        try:
            hypotheses = feed.stream.close()
        except SpeechEngineError as error:
            return self._on_failure(feed, error)
        feed.stream = None
        return self._segments(feed, hypotheses)

    # --- the end of the call ------------------------------------------------------

    def _all_audio_in(self) -> bool:
        if self.ended is None:
            return False
        if not self.enabled:
            return True  # no chunk is transcribed, so none needs waiting for
        for name, count in self.ended.chunk_counts.items():
            feed = self.feeds.get(Track(name))
            if (feed.next_sequence if feed else 0) < count:
                return False
        return True

    def _finish(self) -> list[Event]:
        """Close every stream; done once each closed cleanly (a failed close is retried)."""
        out: list[Event] = []
        for feed in self.feeds.values():
            if feed.stream is not None:
                out.extend(self._close_stream(feed))
                if feed.stream is None and feed.retry_at is None:
                    feed.closed = True
                    feed.spool.clear()
        if any(feed.retry_at is not None or feed.stream for feed in self.feeds.values()):
            return out
        assert self.ended is not None
        out.append(self.ended)
        self.done = True
        return out

    # --- hypotheses to segments ---------------------------------------------------

    def _segments(self, feed: _TrackFeed, hypotheses: list[Hypothesis]) -> list[Event]:
        out: list[Event] = []
        for hyp in hypotheses:
            segment = self._segment(feed, hyp)
            if segment is not None:
                out.append(segment)
        return out

    def _segment(self, feed: _TrackFeed, hyp: Hypothesis) -> TranscriptSegmentProduced | None:
        text = hyp.text.strip()
        span = feed.clock.span(hyp.start_ms, hyp.end_ms)
        if span is None or (span[1] <= feed.committed_ms and not hyp.is_partial):
            self._retire(feed, hyp)  # only filler silence, or already final
            return None
        start = feed.starts.get(hyp.result_id)
        if start is None:
            start = self._pin(feed, hyp.result_id, max(span[0], feed.committed_ms))
        if hyp.is_partial:
            if not text or feed.last_partial.get(hyp.result_id) == text:
                return None
            feed.last_partial[hyp.result_id] = text
            return self._produce(feed, hyp, text, start, span[1])
        self._retire(feed, hyp)
        if not text or start <= feed.last_final_start:
            return None
        self._commit(feed, hyp, start, span[1])
        return self._produce(feed, hyp, text, start, span[1])

    def _pin(self, feed: _TrackFeed, result_id: str, start: int) -> int:
        """A new result's start; near a partial a failed stream orphaned, that one's."""
        for orphan in feed.orphans:
            if abs(orphan - start) <= _ORPHAN_TOLERANCE_MS and orphan > feed.last_final_start:
                feed.orphans.remove(orphan)
                start = orphan
                break
        feed.starts[result_id] = start
        return start

    def _retire(self, feed: _TrackFeed, hyp: Hypothesis) -> None:
        if not hyp.is_partial:
            feed.starts.pop(hyp.result_id, None)
            feed.last_partial.pop(hyp.result_id, None)

    def _commit(self, feed: _TrackFeed, hyp: Hypothesis, start: int, end: int) -> None:
        feed.last_final_start = start
        feed.committed_ms = max(feed.committed_ms, end)
        feed.orphans = [o for o in feed.orphans if o > end]
        feed.spool.release_before(feed.committed_ms)
        while feed.sent and feed.sent[0][1] <= feed.committed_ms:
            feed.sent.popleft()
        feed.spool_full_logged = False
        feed.clock.forget_before(hyp.end_ms)

    def _produce(
        self, feed: _TrackFeed, hyp: Hypothesis, text: str, start: int, end: int
    ) -> TranscriptSegmentProduced:
        words = []
        for w in hyp.words:
            span = feed.clock.span(w.start_ms, w.end_ms)
            if span is not None:
                words.append(WordTiming(w.text, span[0], span[1], w.confidence))
        return TranscriptSegmentProduced(
            contact_id=self.contact_id,
            track=feed.track,
            segment_id=f"{self.contact_id}:{feed.track.value}:{start}",
            start_ms=start,
            end_ms=max(start, end),
            transcript=text,
            is_partial=hyp.is_partial,
            words=tuple(words),
            engine=self.engine.name,
            language_code=self.language,
            call_start_time_ms=self.call_start_time_ms,
        )

    def _extra(self, feed: _TrackFeed) -> dict[str, str]:
        return {"contact_id": self.contact_id, "track": feed.track.value}
