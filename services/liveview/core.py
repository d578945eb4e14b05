"""Live view core: the calls board, built from events, read as JSON.

Pure. `CallBoard.apply` takes CallStarted (calls stream), TranscriptSegmentProduced
and CallEnded (transcripts stream) and RecordingStored (recordings stream: a
recording is listed once it is complete in S3, never polled for). Each segment
is kept under its `segment_id`: a partial is replaced by the next partial and by
the final, and a late partial never replaces a final. `snapshot()` is what the
page renders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from callstream.events import (
    CallEnded,
    CallStarted,
    Event,
    RecordingStored,
    TranscriptSegmentProduced,
)


@dataclass
class Line:
    """One utterance as the page shows it."""

    segment_id: str
    speaker: str
    start_ms: int
    end_ms: int
    text: str
    partial: bool


@dataclass
class CallCard:
    """One call: its lines, whether it ended, its recordings."""

    contact_id: str
    started_ms: int | None = None
    ended: str | None = None
    lines: dict[str, Line] = field(default_factory=dict)
    recordings: dict[str, str] = field(default_factory=dict)  # label -> S3 key
    buckets: dict[str, str] = field(default_factory=dict)  # S3 key -> its bucket

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, lines in time order."""
        lines = sorted(self.lines.values(), key=lambda line: (line.start_ms, line.speaker))
        return {
            "contact_id": self.contact_id,
            "started_ms": self.started_ms,
            "ended": self.ended,
            "lines": [vars(line) for line in lines],
            "recordings": dict(sorted(self.recordings.items())),
        }


class CallBoard:
    """Every call seen, newest first; a version number that moves on each change."""

    def __init__(self, max_calls: int = 50) -> None:
        self.max_calls = max_calls
        self.calls: dict[str, CallCard] = {}
        self.version = 0

    def apply(self, event: Event) -> None:
        """Fold one event into the board."""
        if isinstance(event, CallStarted):
            self._card(event.contact_id).started_ms = event.requested_at_ms
        elif isinstance(event, TranscriptSegmentProduced):
            self._segment(event)
        elif isinstance(event, CallEnded):
            card = self._card(event.contact_id)
            card.ended = event.reason.value
            card.started_ms = card.started_ms or event.call_start_time_ms
        elif isinstance(event, RecordingStored):
            self._recording(event)
        else:
            return
        self.version += 1

    def _recording(self, event: RecordingStored) -> None:
        """A recording is complete: the stereo one, or one side's (labelled by speaker)."""
        card = self._card(event.contact_id)
        if len(event.channel_tracks) == 1:
            label = event.channel_tracks[0].speaker
        else:
            label = " / ".join(t.speaker for t in event.channel_tracks)  # left / right
        card.recordings[label] = event.key
        card.buckets[event.key] = event.bucket

    def bucket_of(self, key: str) -> str | None:
        """The bucket of a recording on the board (only those are served), else None."""
        for card in self.calls.values():
            if key in card.buckets:
                return card.buckets[key]
        return None

    def snapshot(self) -> dict[str, Any]:
        """The board as JSON: active calls first, then ended ones; newest first in each."""
        cards = sorted(
            self.calls.values(), key=lambda c: (c.ended is not None, -(c.started_ms or 0))
        )
        return {"version": self.version, "calls": [card.as_dict() for card in cards]}

    def _segment(self, event: TranscriptSegmentProduced) -> None:
        card = self._card(event.contact_id)
        known = card.lines.get(event.segment_id)
        if known is not None and not known.partial and event.is_partial:
            return  # a late partial never replaces the final
        if not event.transcript.strip() and event.is_partial:
            return
        card.lines[event.segment_id] = Line(
            event.segment_id,
            event.track.speaker,
            event.start_ms,
            event.end_ms,
            event.transcript,
            event.is_partial,
        )
        if card.started_ms is None and event.call_start_time_ms:
            card.started_ms = event.call_start_time_ms

    def _card(self, contact_id: str) -> CallCard:
        card = self.calls.get(contact_id)
        if card is None:
            self._trim(room_for=1)
            card = self.calls[contact_id] = CallCard(contact_id)
        return card

    def _trim(self, room_for: int) -> None:
        """Drop ended calls first, then the oldest, to stay within max_calls."""
        while self.calls and len(self.calls) + room_for > self.max_calls:
            drop = min(self.calls.values(), key=lambda c: (c.ended is None, c.started_ms or 0))
            del self.calls[drop.contact_id]
