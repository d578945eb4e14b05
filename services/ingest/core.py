"""Ingest core: Matroska events of one call's KVS stream in, call events out.

Pure: no I/O, no clock of its own (times come from the stream and from the
caller). `CallIngest.accept(mkv_event)` returns the `AudioChunkCaptured`
events ready so far; `finish(reason)` flushes and returns `CallEnded`.

Chunks are cut at `chunk_ms` and at every fragment (Cluster) end, so the same
fragments always give the same chunks: a call resumed at a fragment boundary
publishes exactly what an undisturbed run would have.

Resuming mid-fragment: a GetMedia connection that drops inside a fragment is
resumed from the last continuation token, so that fragment comes again from
its start. The core counts, per track, the PCM bytes it took from the
fragment in progress and skips exactly that many of the re-read: chunks are
still emitted as soon as `chunk_ms` accumulates (no waiting for fragment
ends), and nothing is lost or published twice.

Gaps: when a track's next frame starts later than its previous PCM ended (a
fragment missing from the stream), the track's buffer is flushed and its next
chunk carries `gap_before_ms`; sample offsets stay contiguous.

Takeover: `export()` gives what has been *published* so far as a plain dict
(PCM still in a track's buffer is left out: it is read again), and
`CallIngest.restore(state)` rebuilds a core that carries on from there; a
fragment cut part-way is read again and the bytes already published are
skipped, as for a dropped connection. `advance(state, events)` moves a saved
state past chunks found on the audio stream that a dead owner published after
its last save; chunks it stored beyond a hole in a batch are remembered per
track (`on_stream`), cut again by the restored core and not returned, so
only the missing ones are published. The session saves the export after each completed fragment
(see docs/ingest.md, "Resume after a takeover").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from callstream.audio import BYTES_PER_MS
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    Track,
)
from callstream.mkv.reports import (
    ClusterEnded,
    ClusterStarted,
    FrameRead,
    StreamError,
    TagsRead,
    TracksRead,
)

log = logging.getLogger(__name__)

TRACK_NAMES = {
    "AUDIO_FROM_CUSTOMER": Track.FROM_CUSTOMER,
    "AUDIO_TO_CUSTOMER": Track.TO_CUSTOMER,
    "Track_audio/L16": Track.FROM_CUSTOMER,  # legacy single-track streams: the customer
}
TAG_CONTACT_ID = "ContactId"
TAG_FRAGMENT_NUMBER = "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
TAG_CONTINUATION = "AWS_KINESISVIDEO_CONTINUATION_TOKEN"
TAG_ERROR_CODE = "AWS_KINESISVIDEO_ERROR_CODE"  # GetMedia's last Tags when it stops on an error
STATE_FORMAT = 1  # of `CallIngest.export()`; bump when its meaning changes


@dataclass
class _TrackState:
    """Per-track accumulation of PCM into chunks."""

    track: Track
    sequence: int = 0
    sample_offset: int = 0  # samples already published
    buffer: bytearray = field(default_factory=bytearray)
    buffer_start_ms: int | None = None  # absolute time of the buffer's first sample
    buffer_fragment: str = ""
    next_time_ms: int | None = None  # absolute time just past the last PCM taken
    gap_ms: int = 0  # missing audio to report on the next chunk
    gap_total_ms: int = 0  # missing audio before the next chunk, since the call began
    fragment_bytes: int = 0  # PCM bytes taken from the fragment in progress
    skip: int = 0  # bytes of a re-read fragment still to skip
    # Sequences a dead owner stored beyond a hole in its last batch: emitted, never returned.
    on_stream: set[int] = field(default_factory=set)


class CallIngest:
    """Turns one contact's MKV events into AudioChunkCaptured events, then CallEnded."""

    def __init__(self, contact_id: str, chunk_ms: int = 128, gap_tolerance_ms: int = 40) -> None:
        self.contact_id = contact_id
        self.chunk_bytes = chunk_ms * BYTES_PER_MS
        self.gap_tolerance_ms = gap_tolerance_ms
        self.fragments_seen = 0  # new fragments started (re-reads not counted)
        self.error_count = 0
        self.server_error: str | None = None  # set by an error tag; the session clears it
        self.tracks: dict[Track, _TrackState] = {}
        self.track_by_number: dict[int, Track] = {}
        self.fragment_number: str | None = None
        self.last_completed_fragment: str | None = None
        self.continuation_token: str | None = None
        self.call_start_time_ms: int | None = None
        self.ended: CallEnded | None = None
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
            self.error_count += 1
            log.warning(
                "corrupt or truncated media at byte %d of the connection (%s); resynchronising",
                event.offset,
                event.reason,
                extra={"contact_id": self.contact_id, "fragment": self.fragment_number},
            )
        return []

    def finish(
        self, reason: EndReason, detail: str, now_ms: int, reconnects: int = 0
    ) -> list[Event]:
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
            stream_errors=self.error_count,
            reconnects=reconnects,
        )
        out.append(self.ended)
        return out

    @property
    def wants_end(self) -> bool:
        """The stream told us the call is over (contact changed, no audio track)."""
        return self._pending_end is not None

    # --- takeover -------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """What is published so far, as JSON-able data; buffered PCM is left to be read again.

        Exact only between `accept` calls whose chunks have all been published.
        """
        return {
            "format": STATE_FORMAT,
            "contact_id": self.contact_id,
            "fragment_number": self.fragment_number,
            "last_completed_fragment": self.last_completed_fragment,
            "continuation_token": self.continuation_token,
            "call_start_time_ms": self.call_start_time_ms,
            "fragments": self.fragments_seen,
            "errors": self.error_count,
            "ended": self.ended is not None,
            "track_numbers": {str(n): t.value for n, t in self.track_by_number.items()},
            "tracks": {t.value: _export_track(s) for t, s in self.tracks.items()},
        }

    @classmethod
    def restore(
        cls, state: dict[str, Any], chunk_ms: int = 128, gap_tolerance_ms: int = 40
    ) -> CallIngest:
        """A core that goes on from an `export()`: the same chunks an undisturbed run gives."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"ingest state format {state.get('format')!r}, not {STATE_FORMAT}")
        core = cls(state["contact_id"], chunk_ms, gap_tolerance_ms)
        core.fragment_number = state["fragment_number"]
        core.last_completed_fragment = state["last_completed_fragment"]
        core.continuation_token = state["continuation_token"]
        core.call_start_time_ms = state["call_start_time_ms"]
        core.fragments_seen = state["fragments"]
        core.error_count = state["errors"]
        core.track_by_number = {int(n): Track(t) for n, t in state["track_numbers"].items()}
        for name, saved in state["tracks"].items():
            track = Track(name)
            core.tracks[track] = _TrackState(
                track,
                sequence=saved["sequence"],
                sample_offset=saved["sample_offset"],
                next_time_ms=saved["next_time_ms"],
                gap_ms=saved["gap_ms"],
                gap_total_ms=saved["gap_total_ms"],
                fragment_bytes=saved["fragment_bytes"],
                on_stream=set(saved.get("on_stream", [])),  # older states lack it
            )
        return core

    # --- handlers -------------------------------------------------------------
    def _tags(self, event: TagsRead) -> list[Event]:
        for name, value in event.tags:
            if name == TAG_FRAGMENT_NUMBER:
                self._fragment_started(value)
            elif name == TAG_CONTINUATION:
                self.continuation_token = value
            elif name == TAG_ERROR_CODE:
                self.server_error = value
            elif name == TAG_CONTACT_ID and value != self.contact_id:
                self._pending_end = (
                    EndReason.CONTACT_CHANGED,
                    f"stream now carries contact {value}",
                )
                return []
        return []

    def _fragment_started(self, number: str) -> None:
        self._skipping = _not_after(number, self.last_completed_fragment)
        if self._skipping:
            return
        rereading = number == self.fragment_number
        for state in self.tracks.values():
            state.skip = state.fragment_bytes if rereading else 0
            state.fragment_bytes = 0
        if rereading:
            log.info(
                "fragment %s read again; skipping what was taken of it",
                number,
                extra={"contact_id": self.contact_id},
            )
        else:
            self.fragment_number = number
            self.fragments_seen += 1

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
        return self.accept_pcm(track, frame.data, frame.timecode_ms)

    def accept_pcm(self, track: Track, data: bytes, time_ms: int) -> list[Event]:
        """Take a run of one track's PCM starting at absolute `time_ms`; return ready chunks."""
        state = self.tracks.setdefault(track, _TrackState(track))
        state.fragment_bytes += len(data)
        if state.skip:
            taken = min(state.skip, len(data))
            state.skip -= taken
            data, time_ms = data[taken:], time_ms + taken // BYTES_PER_MS
            if not data:
                return []
        out = self._check_gap(state, time_ms)
        if not state.buffer:
            state.buffer_start_ms = time_ms
            state.buffer_fragment = self.fragment_number or ""
        if self.call_start_time_ms is None:
            self.call_start_time_ms = time_ms
        state.buffer += data
        state.next_time_ms = time_ms + len(data) // BYTES_PER_MS
        while len(state.buffer) >= self.chunk_bytes:
            out += self._emit(state, self.chunk_bytes)
        return out

    def _check_gap(self, state: _TrackState, time_ms: int) -> list[Event]:
        """Flush before audio that starts later than the track's last PCM ended."""
        if state.next_time_ms is None:
            return []
        gap = time_ms - state.next_time_ms
        if gap <= self.gap_tolerance_ms:
            return []
        log.info(
            "%d ms of %s missing before %d",
            gap,
            state.track.value,
            time_ms,
            extra={"contact_id": self.contact_id, "track": state.track.value},
        )
        out: list[Event] = [*self._emit(state, len(state.buffer))] if state.buffer else []
        state.gap_ms += gap
        state.gap_total_ms += gap
        return out

    def _flush_all(self) -> list[Event]:
        return [c for s in self.tracks.values() if s.buffer for c in self._emit(s, len(s.buffer))]

    def _emit(self, state: _TrackState, size: int) -> list[AudioChunkCaptured]:
        """Cut the next chunk; returned unless a dead owner already stored it (see `advance`)."""
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
            gap_before_ms=state.gap_ms,
            gap_total_ms=state.gap_total_ms,
        )
        state.gap_ms = 0
        state.sequence += 1
        state.sample_offset += size // 2
        state.buffer_start_ms = start_ms + (size // 2) // 8
        if chunk.sequence in state.on_stream:
            state.on_stream = {s for s in state.on_stream if s > chunk.sequence}
            return []
        return [chunk]


def _export_track(state: _TrackState) -> dict[str, Any]:
    # Bytes of the fragment in progress accounted for (a re-read counts its skip),
    # less what is still buffered: the published part, skipped when read again.
    published = state.fragment_bytes + state.skip - len(state.buffer)
    return {
        "sequence": state.sequence,
        "sample_offset": state.sample_offset,
        # The buffer is contiguous from its start, so the published PCM ends there.
        "next_time_ms": state.buffer_start_ms if state.buffer else state.next_time_ms,
        "gap_ms": state.gap_ms,  # owed to the next chunk (the buffer began after a gap)
        "gap_total_ms": state.gap_total_ms,
        "fragment_bytes": published,
        "on_stream": sorted(s for s in state.on_stream if s >= state.sequence),
    }


def advance(
    state: dict[str, Any] | None, contact_id: str, found: Iterable[Event]
) -> dict[str, Any]:
    """`state` moved past this call's events found on the audio stream after it was saved.

    A dead owner may have published chunks after its last save. Per track,
    the unbroken run of sequences after the saved one is taken as published:
    the state goes on from the run's end. Fragments before the newest one
    the runs reach were published whole (a publish returns only once every
    record is stored, and a fragment's chunks go out before the next
    fragment is read), so they count as completed; the newest one may be
    partial: its published bytes per track become the skip of its re-read.

    A batch cut by a kill may have stored a later record of a track but not
    an earlier one. The chunks found beyond such a hole do not move the
    state (the hole is read again); their sequences are kept per track
    (`on_stream`), and the restored core, which cuts the same chunks from
    the same fragments, emits them without returning them: only the missing
    chunks are published. A CallStarted or CallEnded found is not published
    again.

    Still not exact: a publish that outlives the owner's lease (its records
    may land after this read-back) can repeat its chunks. A CallEnded past a
    hole cannot happen (the session publishes it alone, after every chunk
    is stored); were one found, the chunks in the hole stay missing, with a
    warning.
    """
    out = _empty_state(contact_id) if state is None else _copy(state)
    chunks: dict[tuple[str, int], AudioChunkCaptured] = {}
    ended: CallEnded | None = None
    for event in found:
        if getattr(event, "contact_id", None) != contact_id:
            continue
        if isinstance(event, CallStarted):
            out["started"] = True
        elif isinstance(event, CallEnded):
            out["ended"], ended = True, event
        elif isinstance(event, AudioChunkCaptured):
            chunks[(event.track.value, event.sequence)] = event
    fresh = [c for c in chunks.values() if c.sequence >= _saved_sequence(out, c.track.value)]
    runs: dict[str, list[AudioChunkCaptured]] = {}
    for name in dict.fromkeys(c.track.value for c in fresh):  # first seen first, as published
        run, sequence = [], _saved_sequence(out, name)
        while (name, sequence) in chunks:
            run.append(chunks[(name, sequence)])
            sequence += 1
        runs[name] = run
    taken = [c for run in runs.values() for c in run]
    # Only the runs move the fragment bookkeeping: what lies beyond a hole is read again.
    newest = max((c.fragment_number for c in taken), key=_fragment_key, default=None)
    if newest is not None:
        _advance_fragments(out, newest, {c.fragment_number for c in taken})
    for name, run in runs.items():
        saved = out["tracks"].setdefault(name, _empty_track())
        if newest is not None:
            _advance_track(out, saved, run, newest)
        _note_on_stream(saved, {c.sequence for c in fresh if c.track.value == name})
    if ended is not None:
        _warn_if_short(out, ended)
    return out


def _warn_if_short(out: dict[str, Any], ended: CallEnded) -> None:
    """A CallEnded stored past a hole of its own batch: the chunks in the hole stay missing."""
    for name, count in ended.chunk_counts.items():
        if _saved_sequence(out, name) < count:
            log.warning(
                "CallEnded found but %s chunks %d..%d are not on the stream; the call stays ended",
                name,
                _saved_sequence(out, name),
                count - 1,
                extra={"contact_id": ended.contact_id, "track": name},
            )


def _note_on_stream(saved: dict[str, Any], found: set[int]) -> None:
    """Keep the track's sequences stored beyond its run end (found now or by an earlier advance)."""
    known = set(saved.get("on_stream", [])) | found
    saved["on_stream"] = sorted(s for s in known if s >= saved["sequence"])


def _saved_sequence(state: dict[str, Any], track: str) -> int:
    saved: int = state["tracks"].get(track, {}).get("sequence", 0)
    return saved


def _advance_fragments(out: dict[str, Any], newest: str, seen: set[str]) -> None:
    completed = seen - {newest}
    for earlier in (out["fragment_number"], out["last_completed_fragment"]):
        if earlier is not None and earlier != newest:
            completed.add(earlier)  # a saved part-way fragment is complete once a later one is
    out["fragments"] += len(seen - {out["fragment_number"]})
    if out["fragment_number"] != newest:
        for track in out["tracks"].values():
            track["fragment_bytes"] = 0  # nothing of the newest fragment was taken yet
    out["fragment_number"] = newest
    out["last_completed_fragment"] = max(completed, key=_fragment_key) if completed else None
    out["continuation_token"] = None  # older than what is now published: read by number


def _advance_track(
    out: dict[str, Any], saved: dict[str, Any], run: list[AudioChunkCaptured], newest: str
) -> None:
    for chunk in run:
        if chunk.fragment_number == newest:
            saved["fragment_bytes"] += len(chunk.pcm)
        if chunk.sequence == 0 and out["call_start_time_ms"] is None:
            out["call_start_time_ms"] = chunk.start_time_ms
    if not run:
        return
    last = run[-1]
    saved["sequence"] = last.sequence + 1
    saved["sample_offset"] = last.end_sample
    saved["next_time_ms"] = last.start_time_ms + len(last.pcm) // BYTES_PER_MS
    saved["gap_ms"] = 0
    saved["gap_total_ms"] = last.gap_total_ms


def _empty_state(contact_id: str) -> dict[str, Any]:
    return CallIngest(contact_id).export()


def _empty_track() -> dict[str, Any]:
    return {
        "sequence": 0,
        "sample_offset": 0,
        "next_time_ms": None,
        "gap_ms": 0,
        "gap_total_ms": 0,
        "fragment_bytes": 0,
        "on_stream": [],
    }


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    out["tracks"] = {name: dict(track) for name, track in state["tracks"].items()}
    for track in out["tracks"].values():
        track["on_stream"] = list(track.get("on_stream", []))
    return out


def _fragment_key(number: str) -> tuple[int, str]:
    try:
        return int(number), number
    except ValueError:
        return -1, number


def _not_after(fragment: str, last: str | None) -> bool:
    """True when `fragment` was already published (KVS fragment numbers increase)."""
    if last is None:
        return False
    try:
        return int(fragment) <= int(last)
    except ValueError:
        return fragment == last
