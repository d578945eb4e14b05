"""Recorder core: a call's audio events in, the steps that store its recordings out.

Pure: no boto3, no environment, no clock. `CallRecording.accept(event)`
returns `SpoolWrite`s (a chunk's PCM at its byte offset in its track's spool;
the same chunk twice writes the same bytes, so order and replays do not
matter). What to store next is derived from the state: `next_step()` gives one
step at a time (store a part, complete an upload, announce it...), the edge
does it and reports back with `confirm(step, result)`. A step the edge could
not do is simply asked for again: every step is idempotent.

Recordings. A call has up to three: one stereo WAV (8 kHz, 16-bit, a channel
per track in `channel_order`, left first), and one mono WAV per track that has
audio, the layout of the reference Lambda. A track is placed in its own
timeline at `sample_offset + gap_total_ms * 8` (the silence ingest reported
for missing KVS fragments stays silence), from its first chunk; in the stereo
file each track is shifted by its first chunk's capture time minus the call's
first one, so a late-starting track starts late, and a track that ends early
is silence to the end.

Streamed. Each recording is cut into parts of `part_bytes` (S3: every part
but the last at least 5 MiB) as soon as its audio up to the part's end is
settled: every track has all its chunks up to there, or (stereo) has fallen
more than `horizon_ms` behind another, which makes it silence there. The WAV
header (44 bytes, sizes known only at the end) belongs in part 1, so part 1's
PCM is first stored as a side object (the "head", under `<prefix>.incomplete/`),
the parts after it go into a multipart upload as they fill, and at the end
part 1 is uploaded last: the header then the head's bytes. A call shorter
than one part is one PutObject at the end. See docs/recordings.md.

Resumable. `progress()` is a small dict (keys, upload id, parts, how far each
track is durable); `CallRecording.restore()` continues from it. A chunk is
durable once every recording that needs it has it in an uploaded part or the
head; `durable_sequences()` says, per track, how many leading chunks are, so
a takeover re-reads only the rest.

Checked. `CallEnded` counts each track's chunks; a chunk beyond a count
fails the call's open recordings (nothing is presented as complete), missing
chunks are waited for (the edge gives up after a while: `give_up`). A call
without audio stores nothing (`skipped` says why).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE, SAMPLES_PER_MS
from callstream.events import AudioChunkCaptured, CallEnded, Event, RecordingStored, Track
from services.recorder.wav import checksum_b64, crc32_combine, wav_header

HEADER_BYTES = 44
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's floor for every part but the last
CONNECT_CHANNEL_ORDER = (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)  # Connect's: customer left
CHECKSUM_ALGORITHM = "CRC32"
INCOMPLETE = ".incomplete/"  # under the key prefix: heads of recordings still being written
STATE_FORMAT = 1  # of `progress()`; bump when its meaning changes
ALL = 1 << 62  # a spool floor above every byte


class Layout(StrEnum):
    """What a recording holds."""

    STEREO = "stereo"
    PER_TRACK = "per-track"


class Phase(StrEnum):
    """Where a recording is: written, stored whole, announced, or given up."""

    OPEN = "open"
    STORED = "stored"
    ANNOUNCED = "announced"
    SKIPPED = "skipped"  # no audio: nothing stored, nothing announced
    FAILED = "failed"


@dataclass(frozen=True)
class Plan:
    """What to record and how: the settings the core needs (the bucket only names URIs)."""

    bucket: str
    key_prefix: str
    formats: tuple[Layout, ...] = (Layout.PER_TRACK,)
    channel_order: tuple[Track, Track] = CONNECT_CHANNEL_ORDER
    part_bytes: int = MIN_PART_BYTES
    horizon_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.part_bytes % 4 or self.part_bytes <= HEADER_BYTES:
            raise ValueError(f"part_bytes must be a multiple of 4 above 44, got {self.part_bytes}")


# --- what the edge does --------------------------------------------------------------


@dataclass(frozen=True)
class SpoolWrite:
    """Write `pcm` at `byte_offset` of the track's spool."""

    contact_id: str
    track: Track
    byte_offset: int
    pcm: bytes


@dataclass(frozen=True)
class Source:
    """Where a recording's PCM is: per channel, a track and the samples it is shifted by."""

    channels: tuple[tuple[Track, int], ...]

    @property
    def frame_bytes(self) -> int:
        return BYTES_PER_SAMPLE * len(self.channels)


@dataclass(frozen=True)
class Step:
    """Base of the steps; `name` is the recording's (`stereo` or a track)."""

    contact_id: str
    name: str
    key: str


@dataclass(frozen=True)
class UploadWav(Step):
    """PutObject the whole WAV: `header` then PCM [0, pcm_bytes) of `source`."""

    pcm_bytes: int
    header: bytes
    source: Source
    metadata: dict[str, str]
    tags: dict[str, str]


@dataclass(frozen=True)
class StoreHead(Step):
    """PutObject part 1's PCM, [0, end) of `source`, as the side object `head_key`."""

    head_key: str
    end: int
    source: Source


@dataclass(frozen=True)
class CreateUpload(Step):
    """CreateMultipartUpload for `key` (result: the upload id)."""

    metadata: dict[str, str]
    tags: dict[str, str]


@dataclass(frozen=True)
class UploadPart(Step):
    """UploadPart `number`: PCM [start, end) of `source` (result: ETag and CRC32)."""

    upload_id: str
    number: int
    start: int
    end: int
    source: Source


@dataclass(frozen=True)
class UploadFirstPart(Step):
    """UploadPart 1: `header`, then the head object's bytes (result: ETag and CRC32)."""

    upload_id: str
    head_key: str
    head_version: str | None
    header: bytes


@dataclass(frozen=True)
class CompleteUpload(Step):
    """CompleteMultipartUpload with these (number, ETag, CRC32) parts and checksum."""

    upload_id: str
    parts: tuple[tuple[int, str, int], ...]
    checksum: int
    size: int


@dataclass(frozen=True)
class TagRecording(Step):
    """PutObjectTagging: a streamed recording learns its duration only at the end."""

    tags: dict[str, str]


@dataclass(frozen=True)
class CleanUp(Step):
    """Delete the head and abort any other upload of `key` (a crashed attempt's)."""

    head_key: str
    head_version: str | None
    upload_id: str


@dataclass(frozen=True)
class AbortRecording(Step):
    """A failed recording: abort its upload, delete its head; nothing is left as complete."""

    upload_id: str | None
    head_key: str | None
    head_version: str | None


@dataclass(frozen=True)
class Announce(Step):
    """Publish `event`: the recording is complete in S3."""

    event: RecordingStored


@dataclass(frozen=True)
class Result:
    """What the edge learnt doing a step."""

    etag: str = ""
    crc: int = 0
    upload_id: str = ""
    version: str | None = None


# --- state ----------------------------------------------------------------------------


@dataclass
class _Track:
    """One track's chunks: what arrived, where the unbroken run from chunk 0 ends."""

    t0_ms: int | None = None  # capture time of chunk 0's first sample
    next_seq: int = 0  # chunks below have arrived (or were durable when restored)
    contig_end: int = 0  # track samples: end of chunks 0..next_seq-1
    end: int = 0  # track samples: furthest end of any chunk
    max_seq: int = -1
    ahead: dict[int, tuple[int, int]] = field(default_factory=dict)  # seq -> (start, end)
    run: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, end) not yet durable
    durable_seq: int = 0  # leading chunks stored in every recording that needs them
    durable_end: int = 0

    @property
    def started(self) -> bool:
        return self.t0_ms is not None

    def received(self, seq: int) -> bool:
        return seq < self.next_seq or seq in self.ahead


@dataclass
class _Recording:
    """One WAV being written."""

    name: str
    layout: Layout
    tracks: tuple[Track, ...]  # in channel order
    phase: Phase = Phase.OPEN
    key: str | None = None
    head: bool = False
    head_version: str | None = None
    upload_id: str | None = None
    parts: dict[int, tuple[int, str, int]] = field(default_factory=dict)  # n -> (size, etag, crc)
    sealed: int = 0  # PCM bytes durable (head and parts)
    rest_crc: int = 0  # CRC32 of the PCM after part 1's, parts 2.. in order
    tagged: bool = False
    cleaned: bool = False
    total: int | None = None  # PCM bytes, once the call is complete
    checksum: int | None = None  # CRC32 of the whole object, once stored
    silenced: dict[str, list[list[int]]] = field(default_factory=dict)  # track -> frame ranges
    failure: str = ""
    reported: bool = False  # the failure reached a dead letter

    @property
    def frame_bytes(self) -> int:
        return BYTES_PER_SAMPLE * len(self.tracks)

    @property
    def multipart(self) -> bool:
        return self.head


class CallRecording:
    """One call's recordings: a state machine fed events, asked for steps."""

    def __init__(
        self,
        contact_id: str,
        key_prefix: str = "recordings/",
        plan: Plan | None = None,
    ) -> None:
        self.contact_id = contact_id
        self.plan = plan or Plan(bucket="", key_prefix=key_prefix)
        self.tracks: dict[Track, _Track] = {}
        self.recordings: dict[str, _Recording] = {}
        self.ended: CallEnded | None = None
        self.origin_ms: int | None = None  # stereo timeline's sample 0, once fixed
        self.stamp_ms: int | None = None  # the start time in every key, once fixed
        self.skipped: str = ""  # why nothing was stored, for a call without audio
        self.failed = ""  # why the call's recordings were given up (bad counts, missing chunks)
        self.failure_reported = False
        self.changes = 0  # every durable change: the version of `progress()`

    # --- input ------------------------------------------------------------------

    def accept(self, event: Event) -> list[SpoolWrite]:
        """Take one event of this call; return the spool writes it needs."""
        if isinstance(event, AudioChunkCaptured):
            return self._chunk(event)
        if isinstance(event, CallEnded) and self.ended is None:
            self.ended = event
            self._check_counts()
        return []

    def _chunk(self, chunk: AudioChunkCaptured) -> list[SpoolWrite]:
        track = self.tracks.setdefault(chunk.track, _Track())
        if track.received(chunk.sequence):
            return []
        start = chunk.sample_offset + chunk.gap_total_ms * SAMPLES_PER_MS
        end = start + len(chunk.pcm) // BYTES_PER_SAMPLE
        track.max_seq = max(track.max_seq, chunk.sequence)
        track.end = max(track.end, end)
        track.ahead[chunk.sequence] = (start, end)
        if chunk.sequence == 0:
            track.t0_ms = chunk.start_time_ms
        while track.next_seq in track.ahead:
            _, run_end = track.ahead.pop(track.next_seq)
            track.run.append((track.next_seq, run_end))
            track.contig_end = max(track.contig_end, run_end)
            track.next_seq += 1
        self._open_recordings(chunk.track)
        self._check_late(chunk.track, start, end)
        if self.ended is not None:
            self._check_counts()
        return [SpoolWrite(self.contact_id, chunk.track, start * BYTES_PER_SAMPLE, chunk.pcm)]

    def _open_recordings(self, track: Track) -> None:
        if Layout.STEREO in self.plan.formats and "stereo" not in self.recordings:
            self.recordings["stereo"] = _Recording("stereo", Layout.STEREO, self.plan.channel_order)
        if Layout.PER_TRACK in self.plan.formats and track.value not in self.recordings:
            self.recordings[track.value] = _Recording(track.value, Layout.PER_TRACK, (track,))

    def _check_late(self, track: Track, start: int, end: int) -> None:
        """A chunk landing where the stereo file already holds silence for its track fails
        it: the audio came after its place was stored (later than the alignment horizon)."""
        stereo = self.recordings.get("stereo")
        t = self.tracks[track]
        if stereo is None or stereo.phase is not Phase.OPEN or not t.started:
            return
        lead = self._lead(track)
        first, last = lead + start, lead + end
        if t.t0_ms is not None and start == 0:  # chunk 0: the chunks before it came too
            last = lead + t.end
        for lo, hi in stereo.silenced.get(track.value, []):
            if first < hi and lo < last:
                self._fail(
                    stereo,
                    f"{track.value} audio at {first // 8} ms arrived after that part of the "
                    f"stereo recording was stored as silence (more than "
                    f"{self.plan.horizon_ms} ms behind the other track)",
                )
                return

    def _check_counts(self) -> None:
        """A chunk beyond CallEnded's count for its track: the recording cannot be right."""
        assert self.ended is not None
        counts = self.ended.chunk_counts
        for track, t in sorted(self.tracks.items()):
            expected = counts.get(track.value, 0)
            if t.max_seq >= expected:
                self.fail_all(
                    f"CallEnded counts {expected} chunks of {track.value}, "
                    f"but chunk {t.max_seq} arrived"
                )
                return

    # --- what is complete -------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Ended, and every counted chunk of every track has arrived (none beyond)."""
        return self.ended is not None and not self.missing() and not self._extra()

    def missing(self) -> dict[str, int]:
        """After CallEnded: per track, how many counted chunks have not arrived."""
        if self.ended is None:
            return {}
        out = {}
        for name, count in self.ended.chunk_counts.items():
            t = self.tracks.get(Track(name)) if name in Track._value2member_map_ else None
            have = (min(t.next_seq, count) + sum(1 for s in t.ahead if s < count)) if t else 0
            if have < count:
                out[name] = count - have
        return out

    def _extra(self) -> bool:
        assert self.ended is not None
        counts = self.ended.chunk_counts
        return any(t.max_seq >= counts.get(k.value, 0) for k, t in self.tracks.items())

    @property
    def done(self) -> bool:
        """Ended, and every recording stored and announced, skipped, or failed and reported."""
        if self.ended is None or not (self.complete or self.failed):
            return False
        if self.failed and not self.failure_reported:
            return False
        return all(_finished(r) for r in self.recordings.values())

    # --- failures ---------------------------------------------------------------

    def fail_all(self, reason: str) -> None:
        """Give up every recording not yet stored (the call's input cannot make it right)."""
        if self.failed:
            return
        self.failed = f"recordings of contact {self.contact_id} abandoned: {reason}"
        self.changes += 1
        for recording in self.recordings.values():
            if recording.phase is Phase.OPEN:
                self._fail(recording, reason, report=False)

    def give_up(self, reason: str) -> None:
        """The edge waited long enough for missing chunks."""
        self.fail_all(reason)

    def fail(self, name: str, reason: str) -> None:
        """One recording cannot be stored (S3 refused it, its upload vanished)."""
        recording = self.recordings[name]
        if recording.phase in (Phase.OPEN, Phase.STORED):
            self._fail(recording, reason)

    def _fail(self, recording: _Recording, reason: str, report: bool = True) -> None:
        """`report`: the recording's own dead letter; else the call's failure says it."""
        recording.phase = Phase.FAILED
        recording.failure = f"recording {recording.key or recording.name} abandoned: {reason}"
        recording.reported = not report
        self.changes += 1

    def unreported_failures(self) -> list[str]:
        """Failures not yet dead-lettered (the edge reports them, then calls `reported`)."""
        found = [self.failed] if self.failed and not self.failure_reported else []
        return found + [r.failure for r in self.recordings.values() if r.failure and not r.reported]

    def reported(self) -> None:
        """The dead letter of every failure so far is stored."""
        self.failure_reported = bool(self.failed)
        for recording in self.recordings.values():
            recording.reported = True
        self.changes += 1

    # --- steps ------------------------------------------------------------------

    def next_step(self) -> Step | None:
        """The next thing to store, or None until more audio comes."""
        if self.ended is not None and self.complete:
            self._settle_totals()
        for recording in self.recordings.values():
            step = self._step(recording)
            if step is not None:
                return step
        return None

    def _settle_totals(self) -> None:
        for recording in self.recordings.values():
            if recording.total is None and recording.phase is Phase.OPEN:
                recording.total = self._length(recording)
                if recording.total == 0:
                    recording.phase = Phase.SKIPPED
        if all(r.phase is Phase.SKIPPED for r in self.recordings.values()):
            assert self.ended is not None
            self.skipped = self.skipped or (
                f"no audio (CallEnded {self.ended.reason.value}, "
                f"chunk counts {dict(sorted(self.ended.chunk_counts.items()))})"
            )

    def _step(self, r: _Recording) -> Step | None:
        if r.phase is Phase.FAILED:
            if r.upload_id is not None or r.head:
                assert r.key is not None
                head_key = self.head_key(r) if r.head else None
                return AbortRecording(
                    self.contact_id, r.name, r.key, r.upload_id, head_key, r.head_version
                )
            return None
        if r.phase is Phase.STORED:
            return self._after_store(r)
        if r.phase is not Phase.OPEN:
            return None
        first = self.plan.part_bytes - HEADER_BYTES
        if not r.head:
            if r.total is not None and r.total <= first and self.complete:
                return self._whole(r, r.total)
            if self._settled(r) >= first and self._fix_layout(r):
                return StoreHead(
                    self.contact_id, r.name, self._key(r), self.head_key(r), first, self._source(r)
                )
            return None
        assert r.key is not None
        if r.upload_id is None:
            return CreateUpload(
                self.contact_id, r.name, r.key, self._metadata(r), self._tags(r, None)
            )
        return self._next_part(r, first)

    def _next_part(self, r: _Recording, first: int) -> Step | None:
        assert r.key is not None and r.upload_id is not None
        if r.total is None or r.sealed < r.total:
            number = 2 + (r.sealed - first) // self.plan.part_bytes
            end = r.sealed + self.plan.part_bytes
            if r.total is not None and self.complete:
                end = min(end, r.total)
            elif end > self._settled(r):
                return None
            return UploadPart(
                self.contact_id, r.name, r.key, r.upload_id, number, r.sealed, end, self._source(r)
            )
        if 1 not in r.parts:
            return UploadFirstPart(
                self.contact_id,
                r.name,
                r.key,
                r.upload_id,
                self.head_key(r),
                r.head_version,
                wav_header(r.total, channels=len(r.tracks)),
            )
        parts = tuple((n, etag, crc) for n, (_, etag, crc) in sorted(r.parts.items()))
        size = HEADER_BYTES + r.total
        part1_crc = r.parts[1][2]
        checksum = crc32_combine(part1_crc, r.rest_crc, r.total - first)
        return CompleteUpload(self.contact_id, r.name, r.key, r.upload_id, parts, checksum, size)

    def _whole(self, r: _Recording, total: int) -> Step:
        self._fix_layout(r)
        return UploadWav(
            self.contact_id,
            r.name,
            self._key(r),
            total,
            wav_header(total, channels=len(r.tracks)),
            self._source(r),
            self._metadata(r, total),
            self._tags(r, total),
        )

    def _after_store(self, r: _Recording) -> Step | None:
        assert r.key is not None and r.total is not None
        if r.multipart and not r.tagged:
            return TagRecording(self.contact_id, r.name, r.key, self._tags(r, r.total))
        if r.multipart and not r.cleaned:
            assert r.upload_id is not None
            return CleanUp(
                self.contact_id, r.name, r.key, self.head_key(r), r.head_version, r.upload_id
            )
        return Announce(self.contact_id, r.name, r.key, self._event(r))

    # --- the edge reports ---------------------------------------------------------

    def confirm(self, step: Step, result: Result | None = None) -> None:
        """`step` is done (durably); `result` carries what S3 answered."""
        r = self.recordings[step.name]
        result = result or Result()
        if isinstance(step, UploadWav):
            r.key, r.total, r.checksum = step.key, step.pcm_bytes, result.crc
            r.phase, r.sealed = Phase.STORED, step.pcm_bytes
        elif isinstance(step, StoreHead):
            r.key, r.head, r.head_version = step.key, True, result.version
            self._sealed(r, step.end)
        elif isinstance(step, CreateUpload):
            r.upload_id = result.upload_id
        elif isinstance(step, UploadPart):
            r.parts[step.number] = (step.end - step.start, result.etag, result.crc)
            r.rest_crc = crc32_combine(r.rest_crc, result.crc, step.end - step.start)
            self._sealed(r, step.end)
        elif isinstance(step, UploadFirstPart):
            size = self.plan.part_bytes
            r.parts[1] = (size, result.etag, result.crc)
        elif isinstance(step, CompleteUpload):
            r.phase, r.checksum = Phase.STORED, step.checksum
        elif isinstance(step, TagRecording):
            r.tagged = True
        elif isinstance(step, CleanUp):
            r.cleaned = True
        elif isinstance(step, AbortRecording):
            r.upload_id, r.head, r.head_version = None, False, None
        elif isinstance(step, Announce):
            r.phase = Phase.ANNOUNCED
        self.changes += 1
        self._advance_durable()

    def _sealed(self, r: _Recording, end: int) -> None:
        """PCM up to `end` is durable; in stereo, note where a track was stored as silence."""
        if r.layout is Layout.STEREO:
            frame_end = end // r.frame_bytes
            for track in r.tracks:
                t = self.tracks.get(track)
                covered = self._lead(track) + t.contig_end if t and t.started else 0
                if covered < frame_end:
                    _add_range(r.silenced.setdefault(track.value, []), covered, frame_end)
        r.sealed = end

    # --- timelines --------------------------------------------------------------

    def _lead(self, track: Track) -> int:
        """Samples a track is shifted by in the stereo timeline."""
        t = self.tracks.get(track)
        origin = self._origin()
        if t is None or t.t0_ms is None or origin is None:
            return 0
        return (t.t0_ms - origin) * SAMPLES_PER_MS

    def _origin(self) -> int | None:
        if self.origin_ms is not None:
            return self.origin_ms
        starts = [t.t0_ms for t in self.tracks.values() if t.t0_ms is not None]
        return min(starts) if starts else None

    def _fix_layout(self, r: _Recording) -> bool:
        """Fix the key's start time (and the stereo origin) before anything is stored."""
        if self.stamp_ms is None:
            origin = self._origin()
            ended = self.ended.call_start_time_ms if self.ended is not None else None
            self.stamp_ms = ended if ended is not None else origin
        if r.layout is Layout.STEREO and self.origin_ms is None:
            self.origin_ms = self._origin()
        r.key = r.key or self._key(r)
        return self.stamp_ms is not None

    def _source(self, r: _Recording) -> Source:
        if r.layout is Layout.PER_TRACK:
            return Source(((r.tracks[0], 0),))
        return Source(tuple((track, self._lead(track)) for track in r.tracks))

    def _settled(self, r: _Recording) -> int:
        """PCM bytes of `r` no chunk still to come can change (a restored call: only once
        everything after its durable chunks has come again)."""
        if r.total is not None and self.complete:
            return r.total
        if r.layout is Layout.PER_TRACK:
            t = self.tracks.get(r.tracks[0])
            return t.contig_end * BYTES_PER_SAMPLE if t and t.started else 0
        covered = {
            track: self._lead(track) + t.contig_end
            for track in r.tracks
            if (t := self.tracks.get(track)) is not None and t.started
        }
        if not covered:
            return 0
        best = max(covered.values())
        horizon = self.plan.horizon_ms * SAMPLES_PER_MS
        frames = min(max(covered.get(track, 0), best - horizon) for track in r.tracks)
        return max(frames, 0) * r.frame_bytes

    def _length(self, r: _Recording) -> int:
        """PCM bytes of the whole recording (the call is complete)."""
        if r.layout is Layout.PER_TRACK:
            t = self.tracks.get(r.tracks[0])
            return t.end * BYTES_PER_SAMPLE if t else 0
        ends = [
            self._lead(track) + t.end
            for track in r.tracks
            if (t := self.tracks.get(track)) is not None and t.started and t.end
        ]
        return max(ends, default=0) * r.frame_bytes

    def _advance_durable(self) -> None:
        """Move each track's durable run past the chunks every open recording has stored."""
        for track, t in self.tracks.items():
            limit = self._durable_limit(track)
            while t.run and t.run[0][1] <= limit:
                seq, end = t.run.popleft()
                t.durable_seq, t.durable_end = seq + 1, end

    def _durable_limit(self, track: Track) -> float:
        """Track samples below which every recording still being written has the track."""
        limit = float("inf")
        for r in self.recordings.values():
            if track not in r.tracks or r.phase is not Phase.OPEN:
                continue
            if r.layout is Layout.PER_TRACK:
                limit = min(limit, r.sealed // BYTES_PER_SAMPLE)
            elif not r.sealed:
                limit = 0
            else:
                limit = min(limit, r.sealed // r.frame_bytes - self._lead(track))
        return limit

    def spool_floor(self, track: Track) -> int:
        """Bytes of the track's spool no step will read again (`ALL`: none is needed)."""
        limit = self._durable_limit(track)
        return ALL if limit == float("inf") else max(int(limit), 0) * BYTES_PER_SAMPLE

    def durable_sequences(self) -> dict[str, int]:
        """Per track, how many leading chunks every recording has stored."""
        return {track.value: t.durable_seq for track, t in self.tracks.items()}

    # --- names and descriptions -------------------------------------------------

    def _key(self, r: _Recording) -> str:
        if r.key is not None:
            return r.key
        assert self.stamp_ms is not None
        track = None if r.layout is Layout.STEREO else r.tracks[0]
        return recording_key(self.plan.key_prefix, self.contact_id, self.stamp_ms, track)

    def head_key(self, r: _Recording) -> str:
        """The side object holding part 1's PCM until the upload completes."""
        key = self._key(r)
        return f"{self.plan.key_prefix}{INCOMPLETE}{key[len(self.plan.key_prefix) :]}.pcm"

    def _start_ms(self, r: _Recording) -> int | None:
        if r.layout is Layout.STEREO:
            return self.origin_ms if self.origin_ms is not None else self._origin()
        return self.tracks[r.tracks[0]].t0_ms if r.tracks[0] in self.tracks else None

    def _metadata(self, r: _Recording, total: int | None = None) -> dict[str, str]:
        meta = {
            "contact-id": self.contact_id,
            "format": r.layout.value,
            "channels": str(len(r.tracks)),
            "sample-rate": str(SAMPLE_RATE),
            "tracks": ",".join(t.value for t in r.tracks),
        }
        if r.layout is Layout.PER_TRACK:
            meta["track"] = r.name
        start = self._start_ms(r)
        if start is not None:
            meta["start-time"] = iso_stamp(start)
        if total is not None:
            meta["duration-ms"] = str(self._duration_ms(r, total))
        return meta

    def _tags(self, r: _Recording, total: int | None) -> dict[str, str]:
        tags = {
            "contact-id": self.contact_id,
            "format": r.layout.value,
            "channels": str(len(r.tracks)),
            "sample-rate": str(SAMPLE_RATE),
        }
        if total is not None:
            tags["duration-ms"] = str(self._duration_ms(r, total))
        return tags

    def _duration_ms(self, r: _Recording, total: int) -> int:
        return (total // r.frame_bytes) * 1000 // SAMPLE_RATE

    def _event(self, r: _Recording) -> RecordingStored:
        assert r.key is not None and r.total is not None and r.checksum is not None
        return RecordingStored(
            contact_id=self.contact_id,
            s3_uri=f"s3://{self.plan.bucket}/{r.key}",
            bucket=self.plan.bucket,
            key=r.key,
            format=r.layout.value,
            channel_tracks=r.tracks,
            channels=len(r.tracks),
            sample_rate=SAMPLE_RATE,
            duration_ms=self._duration_ms(r, r.total),
            byte_count=HEADER_BYTES + r.total,
            checksum_algorithm=CHECKSUM_ALGORITHM,
            checksum=checksum_b64(r.checksum),
            call_start_time_ms=self._start_ms(r),
        )

    # --- the reference's shape, kept for callers of the first recorder ------------

    def uploads(self) -> list[UploadWav]:
        """The whole-object uploads due now (a call shorter than one part, ended)."""
        if self.complete:
            self._settle_totals()
        steps = [self._step(r) for r in self.recordings.values()]
        return [step for step in steps if isinstance(step, UploadWav)]

    def mark_uploaded(self) -> None:
        """Every due whole-object upload is stored (CRC unknown to this caller: 0)."""
        for step in self.uploads():
            self.confirm(step)

    # --- progress ---------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """What a takeover needs: stored pieces, and how far each track is durable."""
        done = self.done
        return {
            "format": STATE_FORMAT,
            "part_bytes": self.plan.part_bytes,  # parts already numbered by it
            "done": done,
            "version": 2 * self.changes + int(done),  # grows with every save worth making
            "changes": self.changes,
            "failed": self.failed,
            "failure_reported": self.failure_reported,
            "stamp_ms": self.stamp_ms,
            "origin_ms": self.origin_ms,
            "tracks": {
                track.value: {"t0_ms": t.t0_ms, "seq": t.durable_seq, "end": t.durable_end}
                for track, t in sorted(self.tracks.items())
            },
            "recordings": {name: _export(r) for name, r in self.recordings.items()},
        }

    @classmethod
    def restore(cls, contact_id: str, plan: Plan, state: dict[str, Any]) -> CallRecording:
        """A call continued from `progress()`: chunks after the durable ones come again."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"progress format {state.get('format')} is not {STATE_FORMAT}")
        # A call goes on in the part size it started with, whatever the setting is now.
        plan = dataclasses.replace(plan, part_bytes=state["part_bytes"])
        call = cls(contact_id, plan.key_prefix, plan)
        call.stamp_ms, call.origin_ms = state["stamp_ms"], state["origin_ms"]
        call.changes = state["changes"]
        call.failed, call.failure_reported = state["failed"], state["failure_reported"]
        for name, saved in state["tracks"].items():
            seq, end = saved["seq"], saved["end"]
            call.tracks[Track(name)] = _Track(
                t0_ms=saved["t0_ms"],
                next_seq=seq,
                contig_end=end,
                end=end,
                max_seq=seq - 1,
                durable_seq=seq,
                durable_end=end,
            )
        for name, saved in state["recordings"].items():
            call.recordings[name] = _import(name, saved)
        return call


# --- helpers --------------------------------------------------------------------------


def _finished(r: _Recording) -> bool:
    if r.phase is Phase.FAILED:
        return r.reported and r.upload_id is None and not r.head
    return r.phase in (Phase.ANNOUNCED, Phase.SKIPPED)


def _add_range(ranges: list[list[int]], lo: int, hi: int) -> None:
    if ranges and ranges[-1][1] >= lo:
        ranges[-1][1] = max(ranges[-1][1], hi)
    else:
        ranges.append([lo, hi])


def _export(r: _Recording) -> dict[str, Any]:
    return {
        "layout": r.layout.value,
        "tracks": [t.value for t in r.tracks],
        "phase": r.phase.value,
        "key": r.key,
        "head": r.head,
        "head_version": r.head_version,
        "upload_id": r.upload_id,
        "parts": [[n, size, etag, crc] for n, (size, etag, crc) in sorted(r.parts.items())],
        "sealed": r.sealed,
        "rest_crc": r.rest_crc,
        "tagged": r.tagged,
        "cleaned": r.cleaned,
        "total": r.total,
        "checksum": r.checksum,
        "silenced": r.silenced,
        "failure": r.failure,
        "reported": r.reported,
    }


def _import(name: str, saved: dict[str, Any]) -> _Recording:
    return _Recording(
        name=name,
        layout=Layout(saved["layout"]),
        tracks=tuple(Track(t) for t in saved["tracks"]),
        phase=Phase(saved["phase"]),
        key=saved["key"],
        head=saved["head"],
        head_version=saved["head_version"],
        upload_id=saved["upload_id"],
        parts={n: (size, etag, crc) for n, size, etag, crc in saved["parts"]},
        sealed=saved["sealed"],
        rest_crc=saved["rest_crc"],
        tagged=saved["tagged"],
        cleaned=saved["cleaned"],
        total=saved["total"],
        checksum=saved["checksum"],
        silenced={k: [list(x) for x in v] for k, v in saved["silenced"].items()},
        failure=saved["failure"],
        reported=saved["reported"],
    )


def recording_key(prefix: str, contact_id: str, start_ms: int, track: Track | None) -> str:
    """`<prefix><ContactId>_<ISO-8601 start>[_<TRACK>].wav`: the same on every replay."""
    suffix = f"_{track.value}" if track is not None else ""
    return f"{prefix}{contact_id}_{iso_stamp(start_ms)}{suffix}.wav"


def iso_stamp(ms: int) -> str:
    """`2023-11-14T22:13:20.000Z`: the start time in a recording's key."""
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{ms % 1000:03d}Z"
