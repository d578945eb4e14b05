"""Ingest core: Matroska events of one call's KVS stream in, call events out.

Pure: no I/O, no clock of its own (times come from the stream and from the
caller). `CallIngest.accept(mkv_event)` returns the `AudioChunkCaptured`
events ready so far; `finish(reason)` flushes and returns `CallEnded`.

Chunks are cut at `chunk_ms` and at every fragment (Cluster) end, so the same
fragments always give the same chunks: a call resumed at a fragment boundary
publishes exactly what an undisturbed run would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from callstream.events import AudioChunkCaptured, CallEnded, EndReason, Event, Track
from callstream.mkv.events import (
    ClusterEnded,
    ClusterStarted,
    FrameRead,
    StreamError,
    TagsRead,
    TracksRead,
)

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000
TRACK_NAMES = {
    "AUDIO_FROM_CUSTOMER": Track.FROM_CUSTOMER,
    "AUDIO_TO_CUSTOMER": Track.TO_CUSTOMER,
    "Track_audio/L16": Track.FROM_CUSTOMER,  # legacy single-track streams: the customer
}
TAG_CONTACT_ID = "ContactId"
TAG_FRAGMENT_NUMBER = "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
TAG_CONTINUATION = "AWS_KINESISVIDEO_CONTINUATION_TOKEN"


@dataclass
class _TrackState:
    """Per-track accumulation of PCM into chunks."""

    track: Track
    sequence: int = 0
    sample_offset: int = 0  # samples already published
    buffer: bytearray = field(default_factory=bytearray)
    buffer_start_ms: int | None = None  # absolute time of the buffer's first sample
    buffer_fragment: str = ""


class CallIngest:
    """Turns one contact's MKV events into AudioChunkCaptured events, then CallEnded."""

    def __init__(self, contact_id: str, chunk_ms: int = 128) -> None:
        self.contact_id = contact_id
        self.chunk_bytes = chunk_ms * BYTES_PER_MS
        self.tracks: dict[Track, _TrackState] = {}
        self.track_by_number: dict[int, Track] = {}
        self.fragment_number: str | None = None
        self.last_completed_fragment: str | None = None
        self.continuation_token: str | None = None
        self.call_start_time_ms: int | None = None
        self.ended: CallEnded | None = None
        self.errors: list[StreamError] = []
        self._ignored_tracks: set[str] = set()
        self._pending_end: tuple[EndReason, str] | None = None
        self._skipping = False  # inside a fragment already published (a re-read)

    # --- input ----------------------------------------------------------------
    def accept(self, event: object) -> list[Event]:
        """Take one MKV event; return the call events it completes."""
        if self.ended is not None or self._pending_end is not None:
            return []
        if isinstance(event, FrameRead):
            return self._frame(event)
        if isinstance(event, TagsRead):
            return self._tags(event)
        if isinstance(event, TracksRead):
            self._map_tracks(event)
        elif isinstance(event, ClusterEnded):
            if self._skipping:
                return []
            self.last_completed_fragment = self.fragment_number
            return self._flush_all()
        elif isinstance(event, ClusterStarted) and not self.track_by_number:
            self._pending_end = (EndReason.NO_AUDIO_TRACK, "the stream has no audio track")
        elif isinstance(event, StreamError):
            self.errors.append(event)
            log.warning(
                "MKV error at byte %d: %s",
                event.offset,
                event.reason,
                extra={"contact_id": self.contact_id},
            )
        return []

    def finish(self, reason: EndReason, detail: str, now_ms: int) -> list[Event]:
        """Flush every track and end the call (an earlier pending reason wins)."""
        if self.ended is not None:
            return []
        if self._pending_end is not None:
            reason, detail = self._pending_end
        out = self._flush_all()
        self.ended = CallEnded(
            contact_id=self.contact_id,
            reason=reason,
            detail=detail,
            ended_at_ms=now_ms,
            last_fragment_number=self.last_completed_fragment or self.fragment_number,
            chunk_counts={s.track.value: s.sequence for s in self.tracks.values()},
            call_start_time_ms=self.call_start_time_ms,
        )
        out.append(self.ended)
        return out

    @property
    def wants_end(self) -> bool:
        """The stream told us the call is over (contact changed, no audio track)."""
        return self._pending_end is not None

    # --- handlers -------------------------------------------------------------
    def _tags(self, event: TagsRead) -> list[Event]:
        for name, value in event.tags:
            if name == TAG_FRAGMENT_NUMBER:
                self._skipping = _not_after(value, self.last_completed_fragment)
                if not self._skipping:
                    self.fragment_number = value
            elif name == TAG_CONTINUATION:
                self.continuation_token = value
            elif name == TAG_CONTACT_ID and value != self.contact_id:
                self._pending_end = (
                    EndReason.CONTACT_CHANGED,
                    f"stream now carries contact {value}",
                )
                return []
        return []

    def _map_tracks(self, event: TracksRead) -> None:
        self.track_by_number = {}
        for info in event.tracks:
            track = TRACK_NAMES.get(info.name or "")
            if track is None:
                if (info.name or "") not in self._ignored_tracks:
                    self._ignored_tracks.add(info.name or "")
                    log.warning(
                        "ignoring unknown track %r (#%d)",
                        info.name,
                        info.number,
                        extra={"contact_id": self.contact_id},
                    )
                continue
            self.track_by_number[info.number] = track

    def _frame(self, frame: FrameRead) -> list[Event]:
        track = self.track_by_number.get(frame.track_number)
        if track is None or self._skipping:
            return []
        state = self.tracks.setdefault(track, _TrackState(track))
        if not state.buffer:
            state.buffer_start_ms = frame.timecode_ms
            state.buffer_fragment = self.fragment_number or ""
        if self.call_start_time_ms is None:
            self.call_start_time_ms = frame.timecode_ms
        state.buffer += frame.data
        out: list[Event] = []
        while len(state.buffer) >= self.chunk_bytes:
            out.append(self._emit(state, self.chunk_bytes))
        return out

    def _flush_all(self) -> list[Event]:
        return [self._emit(s, len(s.buffer)) for s in self.tracks.values() if s.buffer]

    def _emit(self, state: _TrackState, size: int) -> AudioChunkCaptured:
        pcm = bytes(state.buffer[:size])
        del state.buffer[:size]
        start_ms = state.buffer_start_ms or 0
        chunk = AudioChunkCaptured(
            contact_id=self.contact_id,
            track=state.track,
            sequence=state.sequence,
            sample_offset=state.sample_offset,
            offset_ms=state.sample_offset // 8,
            start_time_ms=start_ms,
            pcm=pcm,
            fragment_number=state.buffer_fragment,
        )
        state.sequence += 1
        state.sample_offset += size // 2
        state.buffer_start_ms = start_ms + (size // 2) // 8
        return chunk


def _not_after(fragment: str, last: str | None) -> bool:
    """True when `fragment` was already published (KVS fragment numbers increase)."""
    if last is None:
        return False
    try:
        return int(fragment) <= int(last)
    except ValueError:
        return fragment == last
