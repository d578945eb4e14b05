"""Transcriber core: a call's audio events in, transcript segments out.

Per call and track, chunks are put back in sequence order (duplicates
dropped), fed to a speech-engine stream, and the engine's hypotheses become
`TranscriptSegmentProduced` with call-relative times. A result keeps the start
time of its first hypothesis, so its partials and its final share one
`segment_id` (derived from contact, track and start): a replay of the same
audio yields the same ids. When the call's CallEnded has arrived and every
chunk it counted has been fed, the streams are closed, the last finals
emitted, and the CallEnded is forwarded to the transcripts stream.

No AWS, no environment: the engine is a port handed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from callstream.asr.base import Hypothesis, RecognitionStream, SpeechEngine
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    Event,
    Track,
    TranscriptSegmentProduced,
    WordTiming,
)

log = logging.getLogger(__name__)


@dataclass
class _TrackFeed:
    """Ordering and engine state of one track."""

    track: Track
    next_sequence: int = 0
    waiting: dict[int, AudioChunkCaptured] = field(default_factory=dict)
    stream: RecognitionStream | None = None
    base_ms: int = 0  # call-relative time of the stream's first sample
    starts: dict[str, int] = field(default_factory=dict)  # result id -> pinned start
    last_partial: dict[str, str] = field(default_factory=dict)


class CallTranscription:
    """One call's transcription state machine."""

    def __init__(
        self, contact_id: str, engine: SpeechEngine, default_language: str = "en-US"
    ) -> None:
        self.contact_id = contact_id
        self.engine = engine
        self.language = default_language
        self.enabled = True
        self.call_start_time_ms: int | None = None
        self.feeds: dict[Track, _TrackFeed] = {}
        self.ended: CallEnded | None = None
        self.done = False

    def accept(self, event: Event) -> list[Event]:
        """Take one event of this call; return segments (and CallEnded) now ready."""
        if self.done:
            return []
        if isinstance(event, CallStarted):
            self.enabled = event.transcription_enabled
            self.language = event.language_code or self.language
        elif isinstance(event, AudioChunkCaptured):
            self._queue(event)
        elif isinstance(event, CallEnded):
            self.ended = event
        return self.poll()

    def poll(self) -> list[Event]:
        """Results the engines have ready; finishes the call once all audio is in."""
        if self.done:
            return []
        out: list[Event] = []
        for feed in self.feeds.values():
            if feed.stream is not None:
                out.extend(self._segments(feed, feed.stream.poll()))
        if self._all_audio_in():
            out.extend(self._finish())
        return out

    def _queue(self, chunk: AudioChunkCaptured) -> None:
        feed = self.feeds.setdefault(chunk.track, _TrackFeed(chunk.track))
        if chunk.sequence < feed.next_sequence or chunk.sequence in feed.waiting:
            return  # a replayed or duplicated chunk
        if self.call_start_time_ms is None and chunk.sample_offset == 0:
            self.call_start_time_ms = chunk.start_time_ms
        feed.waiting[chunk.sequence] = chunk
        while feed.next_sequence in feed.waiting:
            ready = feed.waiting.pop(feed.next_sequence)
            feed.next_sequence += 1
            if self.enabled:
                self._send(feed, ready)

    def _send(self, feed: _TrackFeed, chunk: AudioChunkCaptured) -> None:
        if feed.stream is None:
            feed.base_ms = chunk.offset_ms
            feed.stream = self.engine.open_stream(
                contact_id=self.contact_id, track=feed.track.value, language=self.language
            )
        feed.stream.send(chunk.pcm)

    def _all_audio_in(self) -> bool:
        if self.ended is None:
            return False
        for name, count in self.ended.chunk_counts.items():
            feed = self.feeds.get(Track(name))
            if (feed.next_sequence if feed else 0) < count:
                return False
        return True

    def _finish(self) -> list[Event]:
        out: list[Event] = []
        for feed in self.feeds.values():
            if feed.stream is not None:
                out.extend(self._segments(feed, feed.stream.close()))
                feed.stream = None
        assert self.ended is not None
        out.append(self.ended)
        self.done = True
        return out

    def _segments(self, feed: _TrackFeed, hypotheses: list[Hypothesis]) -> list[Event]:
        out: list[Event] = []
        for hyp in hypotheses:
            segment = self._segment(feed, hyp)
            if segment is not None:
                out.append(segment)
        return out

    def _segment(self, feed: _TrackFeed, hyp: Hypothesis) -> TranscriptSegmentProduced | None:
        text = hyp.text.strip()
        start = feed.starts.setdefault(hyp.result_id, feed.base_ms + hyp.start_ms)
        if hyp.is_partial:
            if not text or feed.last_partial.get(hyp.result_id) == text:
                return None
            feed.last_partial[hyp.result_id] = text
        else:
            feed.starts.pop(hyp.result_id, None)
            feed.last_partial.pop(hyp.result_id, None)
            if not text:
                return None
        return TranscriptSegmentProduced(
            contact_id=self.contact_id,
            track=feed.track,
            segment_id=f"{self.contact_id}:{feed.track.value}:{start}",
            start_ms=start,
            end_ms=max(start, feed.base_ms + hyp.end_ms),
            transcript=text,
            is_partial=hyp.is_partial,
            words=tuple(
                WordTiming(w.text, feed.base_ms + w.start_ms, feed.base_ms + w.end_ms, w.confidence)
                for w in hyp.words
            ),
            engine=self.engine.name,
            language_code=self.language,
            call_start_time_ms=self.call_start_time_ms,
        )
