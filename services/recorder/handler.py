"""The recorder's handler: feeds each call's recording, does its steps, saves how far it got.

For every record: the chunk goes to the call's spool, then the core's next
steps run one after another (a head, a part, a completion, an announcement),
each confirmed to the core only once S3 or the stream has it. A step that
fails (raised: the loop retries the record) is asked for again: they are
idempotent (a part re-uploaded under its number, a completion of an upload
already complete checked against our CRC32).

Resume after a takeover (with a progress store): after every step the call's
`progress()` is saved, and the consumer loop is told through `resume_point`
the record of the first chunk not yet in a stored part (any track; and the
CallEnded once seen), so the shard's checkpoint moves past the rest of the
call. An instance that meets a call it does not hold loads its progress:
done calls are skipped, others continue their upload; only the chunks after
the durable ones are read again.

Bad input is a dead letter, never a short object presented as complete: a
recording that cannot be right (a chunk beyond CallEnded's count, counted
chunks still missing `missing_wait_s` after CallEnded, a request S3 refuses
for good) has its upload aborted and its head deleted, and the record in hand
(or the CallEnded) is rejected with the reason (`callstream.runtime.Rejecting`)
until the loop has stored the dead letter. A call with no audio stores
nothing; the log line and `recordings_skipped` say why.

S3 calls off the loop's thread (`upload_workers` > 0, as the service runs):
a call's due steps run as one chain on a small thread pool, one chain per call
at a time, so a 5 MiB part (or a call's last steps) never holds up the other
calls' records; the core, the spool's writes and the bookkeeping change only
under one lock. A chain's retryable failure is tried again after a backoff
(`tick` restarts it), a configuration fault is raised by the loop's next
`handle`, `tick` or `flush` (the service stops), a rejection by `flush`.
With `upload_workers=0` every step runs inside `handle` (the tests that fail
each effect in turn use that: one order of effects).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callstream.bus.ports import EventSink, Record
from callstream.clock import backoff_delays
from callstream.errors import PoisonRecordError, RetryableError
from callstream.events import AudioChunkCaptured, CallEnded, Event, Track
from callstream.metrics import Metrics
from callstream.progress import ProgressStore
from services.recorder.adapters import S3Recordings, UploadGone
from services.recorder.core import (
    AbortRecording,
    Announce,
    CallRecording,
    CleanUp,
    CompleteUpload,
    CreateUpload,
    Layout,
    Plan,
    Result,
    Source,
    Step,
    StoreHead,
    TagRecording,
    UploadFirstPart,
    UploadPart,
    UploadWav,
    recording_key,
)
from services.recorder.settings import RecorderSettings
from services.recorder.spool import Spool
from services.recorder.wav import interleave

log = logging.getLogger(__name__)
_DONE_MEMORY = 10_000
Position = tuple[str, str]  # (shard id, sequence number) of a record

RECORDINGS_STORED = "recordings_stored"  # counter, label format
RECORDINGS_SKIPPED = "recordings_skipped"  # counter, label reason: calls with no audio
RECORDINGS_FAILED = "recordings_failed"  # counter: recordings given up (dead-lettered)
PARTS_UPLOADED = "recording_parts_uploaded"  # counter
_TRACKS = {t.value for t in Track}
_AFTERWARDS = (TagRecording, CleanUp, AbortRecording)  # best effort once the object is settled


def plan_of(settings: RecorderSettings) -> Plan:
    """The core's view of the settings."""
    left, right = settings.channel_order
    return Plan(
        bucket=settings.bucket,
        key_prefix=settings.key_prefix,
        formats=tuple(Layout(f) for f in settings.formats),
        channel_order=(Track(left), Track(right)),
        part_bytes=settings.part_bytes,
        horizon_ms=settings.align_horizon_ms,
    )


@dataclass
class _CallRecords:
    """Where a call's records are on the shard, and what of it is saved."""

    chunks: dict[tuple[str, int], Position] = field(default_factory=dict)
    last: Position | None = None
    ended: Position | None = None
    ended_record: Record | None = None
    last_record: Record | None = None
    ended_at: float | None = None
    saved: dict[str, Any] | None = None
    fresh: bool = True  # no progress was found when the call was met
    skip_logged: bool = False


class RecorderHandler:
    """Feeds each call's recording and applies its steps."""

    def __init__(
        self,
        settings: RecorderSettings,
        s3: Any,
        sink: EventSink | None = None,
        progress: ProgressStore | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        done_memory: int = _DONE_MEMORY,
        upload_workers: int = 0,
    ) -> None:
        self.settings = settings
        self.plan = plan_of(settings)
        self.store = S3Recordings(s3, settings.bucket, settings.kms_key_id, settings.public_read)
        self.sink = sink
        self.progress = progress
        self.metrics = metrics or Metrics("recorder", "off")
        self.clock = clock
        worker = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.bus.worker_id)
        self.spool = Spool(Path(settings.spool_dir) / worker)
        self.calls: dict[str, CallRecording] = {}
        self.records: dict[str, _CallRecords] = {}
        self.rejections: dict[str, PoisonRecordError] = {}  # until their dead letter is stored
        self.done: OrderedDict[str, None] = OrderedDict()
        self.done_memory = done_memory
        self.lock = threading.RLock()
        self.pool = (
            ThreadPoolExecutor(upload_workers, thread_name_prefix="recorder-s3")
            if upload_workers > 0
            else None
        )
        self.chains: dict[str, Future[None]] = {}  # a call's steps running on the pool
        self.retries: dict[str, tuple[float, Iterator[float]]] = {}  # when, next delays
        self.faults: list[BaseException] = []  # from chains, raised on the loop's thread

    # --- the loop's calls ---------------------------------------------------------

    def handle(self, event: Event, record: Record) -> None:
        with self.lock:
            self._raise_faults()
            self._handle(event, record)

    def _handle(self, event: Event, record: Record) -> None:
        contact_id = getattr(event, "contact_id", None)
        if contact_id is None:
            return
        if self._rejected(contact_id, record) or contact_id in self.done:
            return
        call = self.calls.get(contact_id) or self._start(contact_id)
        if call is None:
            return
        self._remember(contact_id, event, record)
        for write in call.accept(event):
            self.spool.write(write.contact_id, write.track, write.byte_offset, write.pcm)
        if isinstance(event, CallEnded) and self._ended(call, record):
            return
        self._advance(call, record)
        self._rejected(contact_id, record)

    def is_settled(self, contact_id: str) -> bool:
        with self.lock:
            return contact_id in self.done and contact_id not in self.rejections

    def resume_point(self, contact_id: str) -> Position | None:
        """The first record a restart needs: the earliest position of a chunk not yet in
        every recording's stored parts (any track), or of the CallEnded once seen."""
        with self.lock:
            return self._resume_point(contact_id)

    def _resume_point(self, contact_id: str) -> Position | None:
        records = self.records.get(contact_id)
        if records is None or records.saved is None or records.last is None:
            return None
        durable = _durable(records.saved)
        points = [
            position
            for (track, sequence), position in records.chunks.items()
            if sequence >= durable.get(track, 0)
        ]
        if records.ended is not None:
            points.append(records.ended)
        points = points or [records.last]  # all stored: what comes next is unread
        if len({shard for shard, _ in points}) > 1:
            return None  # the call crossed a reshard: keep its first record
        return min(points, key=lambda p: int(p[1]))

    def tick(self) -> None:
        """Give up calls whose counted chunks are still missing `missing_wait_s` after
        CallEnded; restart chains due again (after a retryable failure, or steps that
        became due while a chain was finishing)."""
        with self.lock:
            self._raise_faults()
            self._give_up_waiting()
            if self.pool is not None:
                for contact_id, call in list(self.calls.items()):
                    records = self.records.get(contact_id)
                    if records is not None and records.last_record is not None:
                        self._kick(call, records.last_record)

    def _give_up_waiting(self) -> None:
        now = self.clock()
        for contact_id, call in list(self.calls.items()):
            records = self.records.get(contact_id)
            if records is None or records.ended_at is None or call.complete or call.failed:
                continue
            if now - records.ended_at < self.settings.missing_wait_s:
                continue
            call.give_up(
                f"chunks counted by CallEnded still missing {self.settings.missing_wait_s} s "
                f"after it: {call.missing()}"
            )
            assert records.ended_record is not None
            self._advance(call, records.ended_record)

    def flush(self) -> None:
        """Raise the first rejection whose dead letter is not stored yet (see `Rejecting`)."""
        with self.lock:
            self._raise_faults()
            for rejection in self.rejections.values():
                raise rejection

    def drain(self, timeout_s: float = 60.0) -> None:
        """Wait until no chain runs or is due (tests, benchmarks; a stopping service lets
        its chains finish as the process exits)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.tick()
            with self.lock:
                running = list(self.chains.values())
                waiting = [when for when, _ in self.retries.values()]
            if not running and not waiting:
                return
            if running:
                wait(running, timeout=max(deadline - time.monotonic(), 0))
            else:
                time.sleep(min(0.05, max(min(waiting) - self.clock(), 0)))
        raise TimeoutError(f"recorder chains still running after {timeout_s} s")

    def dead_lettered(self, record: Record) -> None:
        """The dead letter of `record` is stored: its call's failures are reported."""
        with self.lock:
            self._dead_lettered(record)

    def _dead_lettered(self, record: Record) -> None:
        for contact_id, rejection in list(self.rejections.items()):
            if rejection.record != record:
                continue
            del self.rejections[contact_id]
            call = self.calls.get(contact_id)
            if call is not None:
                call.reported()
                self._finish(call)

    def forget(self, contact_ids: Iterable[str]) -> None:
        with self.lock:
            self._forget(contact_ids)

    def _forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            self.retries.pop(contact_id, None)  # a running chain stops: the call is not ours
            self.calls.pop(contact_id, None)
            self.records.pop(contact_id, None)
            self.rejections.pop(contact_id, None)  # the new owner reports it again
            self.spool.discard(contact_id)

    # --- calls met for the first time -----------------------------------------------

    def _start(self, contact_id: str) -> CallRecording | None:
        state = self.progress.load(contact_id) if self.progress is not None else None
        if state is not None and state["done"]:
            self._retire(contact_id)
            return None
        if state is None:
            call = CallRecording(contact_id, self.plan.key_prefix, self.plan)
        else:
            call = CallRecording.restore(contact_id, self.plan, state)
            log.info("resuming the recording", extra={"contact_id": contact_id})
        self.calls[contact_id] = call
        self.records[contact_id] = _CallRecords(saved=state, fresh=state is None)
        self._floors(call)
        return call

    def _remember(self, contact_id: str, event: Event, record: Record) -> None:
        records = self.records.setdefault(contact_id, _CallRecords())
        position = (record.shard_id, record.sequence_number)
        records.last, records.last_record = position, record
        if isinstance(event, AudioChunkCaptured):
            records.chunks.setdefault((event.track.value, event.sequence), position)
        elif isinstance(event, CallEnded) and records.ended is None:
            records.ended, records.ended_record = position, record
            records.ended_at = self.clock()

    def _ended(self, call: CallRecording, record: Record) -> bool:
        """CallEnded with chunks missing: a replay of a call recorded before is skipped;
        True when the call is settled here."""
        missing = call.missing()
        if not missing or call.failed:
            return False
        log.info(
            "call ended with chunks still missing: %s (waiting up to %d s)",
            missing,
            self.settings.missing_wait_s,
            extra={"contact_id": call.contact_id},
        )
        records = self.records[call.contact_id]
        if records.fresh and self._already_stored(call):
            log.info(
                "replayed call already recorded; skipped", extra={"contact_id": call.contact_id}
            )
            self._retire(call.contact_id)
            return True
        return False

    def _already_stored(self, call: CallRecording) -> bool:
        """A replay met mid-call without progress (its first records were checkpointed as
        done): were its recordings stored? (keys from CallEnded's start time)"""
        assert call.ended is not None
        start = call.ended.call_start_time_ms
        if start is None:
            return False
        keys = _expected_keys(self.plan, call.contact_id, start, call.ended.chunk_counts)
        return bool(keys) and all(self.store.exists(key) for key in keys)

    # --- steps ------------------------------------------------------------------------

    def _advance(self, call: CallRecording, record: Record) -> None:
        """Do the call's due steps, saving progress after each; report failures; retire.
        With a pool, the steps run as the call's chain there."""
        if self.pool is not None:
            self._kick(call, record)
            return
        while (step := call.next_step()) is not None:
            self.spool.flush(call.contact_id)  # what the step reads is on disk
            result = self._attempt(call, step)
            if result is not None:
                call.confirm(step, result)
                self._after(call, step)
        self._report(call, record)
        self._finish(call)

    def _attempt(self, call: CallRecording, step: Step) -> Result | None:
        """Do one step; None if it cannot be done (the recording failed)."""
        try:
            return self._do(call.contact_id, step)
        except (UploadGone, PoisonRecordError) as e:
            if isinstance(step, _AFTERWARDS):
                log.error("%s", e, extra={"contact_id": call.contact_id})
                return Result()
            call.fail(step.name, str(e))
            return None

    def _kick(self, call: CallRecording, record: Record) -> None:
        """Start the call's chain unless one runs, it waits to retry, or nothing is due.
        (The lock is held.)"""
        contact_id = call.contact_id
        if contact_id in self.chains or self.calls.get(contact_id) is not call:
            return
        retry = self.retries.get(contact_id)
        if retry is not None and retry[0] > self.clock():
            return
        if call.next_step() is None:
            self._report(call, record)
            self._finish(call)
            return
        assert self.pool is not None
        self.chains[contact_id] = self.pool.submit(self._chain, call, record)

    def _chain(self, call: CallRecording, record: Record) -> None:
        """On the pool: the call's due steps, one after another. S3 and DynamoDB are
        called outside the lock; the core and the bookkeeping change under it."""
        contact_id = call.contact_id
        try:
            while True:
                with self.lock:
                    ours = self.calls.get(contact_id) is call
                    step = call.next_step() if ours else None
                    if step is None:
                        self._chain_ends(call, record, ours)
                        return
                    self.spool.flush(contact_id)  # what the step reads is on disk
                result = self._attempt(call, step)
                state = None
                with self.lock:
                    if result is not None and self.calls.get(contact_id) is call:
                        call.confirm(step, result)
                        state = self._after(call, step, save=False)
                    self.retries.pop(contact_id, None)
                if state is not None:
                    self._store(contact_id, state)
                    with self.lock:
                        self._saved(contact_id, state)
        except RetryableError as e:
            with self.lock:
                self._retry_later(contact_id, e)
        except BaseException as e:  # a configuration fault or a bug: the loop's thread raises it
            with self.lock:
                self.chains.pop(contact_id, None)
                self.faults.append(e)

    def _chain_ends(self, call: CallRecording, record: Record, ours: bool) -> None:
        """Nothing more is due (the lock is held): report; a done call is saved, then
        retired, its chain kept meanwhile so no other starts."""
        if not ours:
            del self.chains[call.contact_id]
            return
        self._report(call, record)
        state = self._snapshot(call) if call.done else None
        if state is None:
            del self.chains[call.contact_id]
            if call.done:
                self._retire(call.contact_id)
            return
        self.lock.release()
        try:
            self._store(call.contact_id, state)
        finally:
            self.lock.acquire()
        del self.chains[call.contact_id]
        self._saved(call.contact_id, state)
        self._retire(call.contact_id)

    def _retry_later(self, contact_id: str, error: RetryableError) -> None:
        self.chains.pop(contact_id, None)
        _, delays = self.retries.get(contact_id) or (0.0, backoff_delays(base_s=0.1, cap_s=5.0))
        delay = next(delays)
        self.retries[contact_id] = (self.clock() + delay, delays)
        log.warning("retrying in %.1f s after: %s", delay, error, extra={"contact_id": contact_id})

    def _raise_faults(self) -> None:
        if self.faults:
            raise self.faults.pop(0)

    def _do(self, contact_id: str, step: Step) -> Result:
        if isinstance(step, UploadWav):
            body = step.header + self._pcm(contact_id, step.source, 0, step.pcm_bytes)
            crc = zlib.crc32(body)
            version = self.store.put_wav(step.key, body, crc, step.metadata, step.tags)
            return Result(crc=crc, version=version)
        if isinstance(step, StoreHead):
            body = self._pcm(contact_id, step.source, 0, step.end)
            version = self.store.put_head(step.head_key, body, zlib.crc32(body))
            return Result(version=version)
        if isinstance(step, CreateUpload):
            return Result(upload_id=self.store.create_upload(step.key, step.metadata, step.tags))
        if isinstance(step, UploadPart):
            body = self._pcm(contact_id, step.source, step.start, step.end)
            return self._part(step.key, step.upload_id, step.number, body)
        if isinstance(step, UploadFirstPart):
            body = step.header + self.store.read_head(step.head_key, step.head_version)
            if len(body) != len(step.header) + self._first_pcm(contact_id):
                raise UploadGone(f"head {step.head_key} holds {len(body) - 44} bytes, not ours")
            return self._part(step.key, step.upload_id, 1, body)
        if isinstance(step, CompleteUpload):
            self.store.complete(step.key, step.upload_id, step.parts, step.checksum, step.size)
            return Result()
        return self._do_afterwards(step)

    def _do_afterwards(self, step: Step) -> Result:
        if isinstance(step, TagRecording):
            self.store.tag(step.key, step.tags)
        elif isinstance(step, CleanUp):
            self.store.delete_head(step.head_key, step.head_version)
            self.store.abort_others(step.key, keep=step.upload_id)
        elif isinstance(step, AbortRecording):
            if step.upload_id is not None:
                self.store.abort(step.key, step.upload_id)
            if step.head_key is not None:
                self.store.delete_head(step.head_key, step.head_version)
            self.store.abort_others(step.key, keep=None)
        elif isinstance(step, Announce) and self.sink is not None:
            self.sink.publish([step.event])
        return Result()

    def _first_pcm(self, contact_id: str) -> int:
        """PCM bytes a head holds: the call's part size (restored ones keep theirs), less
        the header's 44."""
        call = self.calls.get(contact_id)
        part_bytes = call.plan.part_bytes if call is not None else self.settings.part_bytes
        return part_bytes - 44

    def _part(self, key: str, upload_id: str, number: int, body: bytes) -> Result:
        crc = zlib.crc32(body)
        return Result(etag=self.store.upload_part(key, upload_id, number, body, crc), crc=crc)

    def _pcm(self, contact_id: str, source: Source, start: int, end: int) -> bytes:
        """Recording bytes [start, end): each channel's track, shifted, interleaved."""
        first, last = start // source.frame_bytes, end // source.frame_bytes
        return interleave(
            [
                self.spool.read(contact_id, track, (first - lead) * 2, (last - lead) * 2)
                for track, lead in source.channels
            ]
        )

    def _after(self, call: CallRecording, step: Step, save: bool = True) -> dict[str, Any] | None:
        """A step is done: free the spool below what is stored, save progress (or return
        the state to save, `save=False`), say so."""
        self._floors(call)
        state = self._snapshot(call)
        if save and state is not None:
            self._store(call.contact_id, state)
            self._saved(call.contact_id, state)
            state = None
        extra = {"contact_id": call.contact_id, "track": step.name}
        if isinstance(step, (UploadPart, UploadFirstPart)):
            self.metrics.count(PARTS_UPLOADED)
        elif isinstance(step, (UploadWav, CompleteUpload)):
            log.info("stored s3://%s/%s", self.settings.bucket, step.key, extra=extra)
        elif isinstance(step, Announce):
            self.metrics.count(RECORDINGS_STORED, format=step.event.format)
            log.info(
                "RecordingStored %s (%d ms, %d bytes, CRC32 %s)",
                step.event.s3_uri,
                step.event.duration_ms,
                step.event.byte_count,
                step.event.checksum,
                extra=extra,
            )
        return state

    def _floors(self, call: CallRecording) -> None:
        for track in call.tracks:
            self.spool.discard_below(call.contact_id, track, call.spool_floor(track))

    def _report(self, call: CallRecording, record: Record) -> None:
        """Failures become a rejection of `record`; a call without audio says why."""
        failures = call.unreported_failures()
        records = self.records.get(call.contact_id)
        if call.failed and records is not None and records.ended_record is not None:
            record = records.ended_record  # the call's input is wrong: its end says so
        if failures and call.contact_id not in self.rejections:
            reason = "; ".join(failures)
            self.metrics.count(RECORDINGS_FAILED, len(failures))
            log.error(reason, extra={"contact_id": call.contact_id})
            self.rejections[call.contact_id] = PoisonRecordError(reason, record)
        if call.skipped and records is not None and not records.skip_logged:
            records.skip_logged = True
            assert call.ended is not None
            self.metrics.count(RECORDINGS_SKIPPED, reason=call.ended.reason.value)
            log.warning(
                "no recording stored: %s", call.skipped, extra={"contact_id": call.contact_id}
            )

    def _rejected(self, contact_id: str, record: Record) -> bool:
        """A call waiting for its dead letter: raise for the rejected record, skip others."""
        pending = self.rejections.get(contact_id)
        if pending is None:
            return False
        if pending.record == record:
            raise pending
        return True

    def _save(self, call: CallRecording) -> None:
        """Save the call's progress (raises RetryableError: the loop retries)."""
        state = self._snapshot(call)
        if state is not None:
            self._store(call.contact_id, state)
            self._saved(call.contact_id, state)

    def _snapshot(self, call: CallRecording) -> dict[str, Any] | None:
        """The call's progress to save, if it is saved anywhere."""
        if self.progress is None or call.contact_id not in self.records:
            return None
        return call.progress()

    def _store(self, contact_id: str, state: dict[str, Any]) -> None:
        assert self.progress is not None
        self.progress.save(contact_id, state, state["version"])

    def _saved(self, contact_id: str, state: dict[str, Any]) -> None:
        """`state` is stored: resume points follow it; chunk positions before it go."""
        records = self.records.get(contact_id)
        if records is None or (records.saved and records.saved["version"] > state["version"]):
            return
        records.saved = state
        durable = _durable(state)
        for key in [k for k in records.chunks if k[1] < durable.get(k[0], 0)]:
            del records.chunks[key]

    def _finish(self, call: CallRecording) -> None:
        if call.done:
            self._save(call)
            self._retire(call.contact_id)

    def _retire(self, contact_id: str) -> None:
        self.retries.pop(contact_id, None)
        self.calls.pop(contact_id, None)
        self.records.pop(contact_id, None)
        self.spool.discard(contact_id)
        self.done[contact_id] = None
        while len(self.done) > self.done_memory:
            self.done.popitem(last=False)


def records_extra(call: CallRecording) -> dict[str, str]:
    """Log fields of a call."""
    return {"contact_id": call.contact_id}


def _durable(state: dict[str, Any]) -> dict[str, int]:
    """Per track, the first chunk sequence not stored in every recording."""
    return {track: saved["seq"] for track, saved in state["tracks"].items()}


def _expected_keys(plan: Plan, contact_id: str, start_ms: int, counts: dict[str, int]) -> list[str]:
    """The keys a call's recordings get when its start time is `start_ms`."""
    tracks = sorted(Track(name) for name, n in counts.items() if n > 0 and name in _TRACKS)
    keys = []
    if Layout.STEREO in plan.formats and tracks:
        keys.append(recording_key(plan.key_prefix, contact_id, start_ms, None))
    if Layout.PER_TRACK in plan.formats:
        keys += [recording_key(plan.key_prefix, contact_id, start_ms, t) for t in tracks]
    return keys
