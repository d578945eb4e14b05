"""The consumer loop every service runs: poll, decode, handle, checkpoint.

Checkpoints mean "done": many calls interleave on a shard, so the loop keeps,
per shard, the first record of every call whose effects are not yet durable
(the handler says when a call is settled) and checkpoints at the oldest of
those, or past the last record when none is open. After a crash the shard is
replayed from there; handlers write idempotent outputs, so a replay rewrites
the same rows and objects.

Undecodable records and records a handler rejects go to the dead-letter
stream with their bytes and the reason; retryable failures back off and retry
the same record; nothing is skipped silently.

A handler may buffer effects (the persister batches rows): it then has an
optional `flush()` (see `Flushing`), called with retries after each batch
and before every checkpoint, and it reports its buffered calls as unsettled
until flushed. Handlers without `flush` need not change.

A call lasts minutes, and one call's first record would hold its shard's
checkpoint back for all of it. A handler that saves per-call progress (see
`callstream.progress`) may say, through the optional `resume_point()` (see
`Resuming`), from which record a restart needs the call again; the loop then
keeps that record instead of the call's first.

A `ConfigurationFault` (access denied, a missing table, stream or bucket; see
`callstream.awserrors`) from a handler, its flush or tick, or from publishing
a dead letter stops the loop: it is logged as critical and counted
(`configuration_faults`), the record is neither dead-lettered nor passed by
the checkpoint, the leases are released as on a normal stop, and `run`
raises it, so the process exits non-zero (`callstream.service`).

A record written with a schema version this consumer lacks
(`UnknownWriterSchema`: producers upgraded before it) is never dead-lettered:
its shard pauses at that record (`ShardPauses`) while the other shards go on,
and is read again from it with backoff, so once the consumer has the schema
(an upgraded contract, a restart) every record is processed as if nothing had
happened. Nothing of a paused shard is held in memory.

Stopping (SIGTERM): the loop finishes the record in hand, flushes, takes a
last checkpoint and releases its leases, so another instance resumes at once.
Retryable failures are still retried for `stop_grace_s` after the stop
(ECS and Kubernetes wait 30 s before SIGKILL); then the loop gives up and
leaves the unfinished records to the next owner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from callstream.bus.ports import RawSink, Record, RecordSource
from callstream.clock import backoff_delays, now_ms
from callstream.contract import Contract, default_contract
from callstream.errors import (
    ConfigurationFault,
    PoisonRecordError,
    RetryableError,
    UnknownWriterSchema,
)
from callstream.events import AudioChunkCaptured, DeadLetter, Event, TranscriptSegmentProduced
from callstream.metrics import (
    CALLS_IN_PROGRESS,
    CHUNKS,
    CONFIGURATION_FAULTS,
    DEAD_LETTERS,
    ERRORS,
    RECORDS,
    SEGMENTS,
    SHARDS_PAUSED,
    Metrics,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class Handler(Protocol):
    """A service's glue between decoded events and its pure core."""

    def handle(self, event: Event, record: Record) -> None:
        """Process one event; apply its effects durably or raise."""

    def is_settled(self, contact_id: str) -> bool:
        """True when every effect of this call's records so far is durable."""

    def tick(self) -> None:
        """Periodic work between polls (engine results, timeouts)."""

    def forget(self, contact_ids: Iterable[str]) -> None:
        """Drop in-memory state of calls whose shard this instance lost."""


@runtime_checkable
class Flushing(Protocol):
    """Optional extension of a Handler that buffers effects between records."""

    def flush(self) -> None:
        """Apply buffered effects durably or raise (RetryableError: retried)."""


@runtime_checkable
class Resuming(Protocol):
    """Optional extension of a Handler whose calls can resume mid-way after a restart."""

    def resume_point(self, contact_id: str) -> tuple[str, str] | None:
        """(shard id, sequence number) of the earliest record of this unsettled call a
        restart needs again, its effects before it being durable; None: its first record."""


@runtime_checkable
class Rejecting(Protocol):
    """Optional extension of a Flushing handler whose flush can reject one record's effects.

    Its flush raises `PoisonRecordError(reason, record)` naming the record, keeps
    that call unsettled and raises it again at every flush until told here that the
    dead letter is stored, so a dead letter that could not be published is not lost."""

    def dead_lettered(self, record: Record) -> None:
        """The dead letter of `record` is stored; forget its rejected effects."""


class ServiceLoop:
    """Runs one handler over one record source until stopped."""

    def __init__(
        self,
        service: str,
        source: RecordSource,
        handler: Handler,
        deadletters: RawSink,
        contract: Contract | None = None,
        poll_interval_s: float = 0.2,
        stop_grace_s: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics(service, "off")
        self.service = service
        self.source = source
        self.handler = handler
        self.deadletters = deadletters
        self.contract = contract or default_contract()
        self.poll_interval_s = poll_interval_s
        self.stop_grace_s = stop_grace_s
        self._grace_ends: float | None = None
        self._open: dict[str, dict[str, str]] = {}  # shard -> contact -> first unsettled seq
        self._last: dict[str, str] = {}  # shard -> last processed seq
        self.pauses = ShardPauses()  # shards waiting for a writer schema we lack

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set, then checkpoint and release the shards."""
        try:
            while not stop.is_set():
                records = self.source.poll()
                self.process(records, stop)
                self._retrying(self.handler.tick, stop)
                self._retrying(self.flush, stop)
                self.checkpoint()
                if not records:
                    stop.wait(self.poll_interval_s)
        except RetryableError as e:  # only raised once `stop` is set: replayed by the next owner
            log.warning("stopped while retrying: %s", e)
        except ConfigurationFault as e:  # no record can succeed: stop, checkpoint before it
            self.metrics.count(CONFIGURATION_FAULTS)
            self.metrics.count(ERRORS, type=type(e).__name__)
            log.critical("configuration fault, stopping %s: %s", self.service, e)
            raise
        finally:
            stop.set()
            self._last_flush(stop)
            self.checkpoint()
            self.source.close()

    def flush(self) -> None:
        """Make the handler's buffered effects durable (no-op for plain handlers).

        A flush that rejects the effects of one record (`PoisonRecordError`
        naming it) dead-letters that record and flushes the rest."""
        flush_rejecting(self.handler, self._reject)

    def _last_flush(self, stop: threading.Event) -> None:
        try:
            self._retrying(self.flush, stop)
        except Exception:  # unflushed calls stay unsettled: the checkpoint keeps them
            log.exception("final flush failed; its records will be replayed")

    def process(self, records: list[Record], stop: threading.Event | None = None) -> None:
        """Decode and handle records in order; dead-letter what cannot be processed."""
        for record in records:
            if self.pauses.holds_back(record.shard_id, record.sequence_number):
                continue  # not kept: read again from the stuck record after the pause
            self.metrics.count(RECORDS, shard=record.shard_id)
            try:
                contact = self._handle_with_retry(record, stop)
            except _ShardPaused as paused:
                self._pause(record, paused.error)
                continue
            self.pauses.passed(record.shard_id, record.sequence_number)
            self._last[record.shard_id] = record.sequence_number
            if contact is not None:
                self._open.setdefault(record.shard_id, {}).setdefault(
                    contact, record.sequence_number
                )
        self._resume_paused()

    def _pause(self, record: Record, error: UnknownWriterSchema) -> None:
        delay = self.pauses.pause(record.shard_id, record.sequence_number)
        self.metrics.count(ERRORS, type=type(error).__name__)
        log.error(
            "shard paused at record %s, retried in %.0f s: %s",
            record.sequence_number,
            delay,
            error,
            extra={
                "shard_id": record.shard_id,
                "stream": record.stream,
                "fingerprint": error.fingerprint,
            },
        )

    def _resume_paused(self) -> None:
        """Read paused shards again from their stuck record once their backoff is over."""
        for shard_id, sequence_number in self.pauses.due():
            try:
                self.source.rewind(shard_id, sequence_number)
            except RetryableError as e:
                self.pauses.pause(shard_id, sequence_number)
                log.warning("paused shard not re-read yet: %s", e, extra={"shard_id": shard_id})
                continue
            self.pauses.resumed(shard_id)
            log.info(
                "re-reading paused shard from %s", sequence_number, extra={"shard_id": shard_id}
            )
        self.metrics.gauge(SHARDS_PAUSED, len(self.pauses))

    def checkpoint(self) -> None:
        """Checkpoint each shard at its oldest unsettled call, or past its last record."""
        for shard_id, last in list(self._last.items()):
            open_calls = self._open.get(shard_id, {})
            for contact in [c for c in open_calls if self.handler.is_settled(c)]:
                del open_calls[contact]
            self._advance(shard_id, open_calls)
            if open_calls:
                oldest = min(open_calls.values(), key=int)
                self.source.checkpoint(shard_id, oldest, inclusive=True)
            else:
                self.source.checkpoint(shard_id, last, inclusive=False)
        self.metrics.gauge(CALLS_IN_PROGRESS, sum(len(calls) for calls in self._open.values()))

    def _advance(self, shard_id: str, open_calls: dict[str, str]) -> None:
        """Move open calls' safe points up to where the handler says they resume.

        Only within the shard: a call that crossed a reshard keeps its
        records on the parent until it settles."""
        if not isinstance(self.handler, Resuming):
            return
        for contact, first in open_calls.items():
            point = self.handler.resume_point(contact)
            if point is not None and point[0] == shard_id and int(point[1]) > int(first):
                open_calls[contact] = point[1]

    def _count(self, event: Event) -> None:
        if isinstance(event, AudioChunkCaptured):
            self.metrics.count(CHUNKS)
        elif isinstance(event, TranscriptSegmentProduced):
            self.metrics.count(SEGMENTS, kind="partial" if event.is_partial else "final")

    def shard_lost(self, shard_id: str) -> None:
        """Forget the calls of a shard another instance now owns."""
        contacts = self._open.pop(shard_id, {})
        self._last.pop(shard_id, None)
        self.pauses.drop(shard_id)
        self.handler.forget(contacts)

    def _handle_with_retry(self, record: Record, stop: threading.Event | None) -> str | None:
        return self._retrying(lambda: self._handle(record), stop, record.shard_id)

    def _retrying(
        self, action: Callable[[], T], stop: threading.Event | None, shard_id: str | None = None
    ) -> T:
        """Run `action`, backing off with jitter on RetryableError until it passes or we stop."""
        delays = backoff_delays(base_s=0.1, cap_s=5.0)
        while True:
            try:
                return action()
            except RetryableError as e:
                self.metrics.count(ERRORS, type="retryable")
                log.warning("retrying after: %s", e, extra={"shard_id": shard_id})
                if stop is not None and stop.is_set() and self._grace_over():
                    raise
                time.sleep(next(delays))

    def _grace_over(self) -> bool:
        """After a stop, retries go on for `stop_grace_s`, then give up."""
        if self._grace_ends is None:
            self._grace_ends = time.monotonic() + self.stop_grace_s
        return time.monotonic() > self._grace_ends

    def _handle(self, record: Record) -> str | None:
        try:
            event = self.contract.decode(record.data)
            self._apply(event, record)
            self._count(event)
        except UnknownWriterSchema as e:  # not the record's fault: never dead-lettered
            raise _ShardPaused(e) from e
        except PoisonRecordError as e:
            self._reject(record, e)
            return None
        except (RetryableError, ConfigurationFault):
            raise
        except Exception as e:  # a record that breaks the handler must not stop the shard
            log.exception("record rejected", extra={"shard_id": record.shard_id})
            self._dead_letter(record, f"{type(e).__name__}: {e}", type(e).__name__)
            return None
        return getattr(event, "contact_id", None)

    def _apply(self, event: Event, record: Record) -> None:
        handle_rejecting(self.handler, event, record, self._reject)

    def _reject(self, record: Record, error: PoisonRecordError) -> None:
        self._dead_letter(record, error.reason, type(error).__name__)
        acknowledge_rejection(self.handler, error)

    def _dead_letter(self, record: Record, reason: str, error_type: str) -> None:
        self.metrics.count(DEAD_LETTERS)
        self.metrics.count(ERRORS, type=error_type)
        dead_letter(self.deadletters, self.contract, self.service, record, reason, error_type)


Reject = Callable[[Record, PoisonRecordError], None]  # dead-letter a record, and acknowledge


def handle_rejecting(handler: Handler, event: Event, record: Record, reject: Reject) -> None:
    """`handler.handle`; when a flush inside it rejects an earlier record, that one is
    rejected and this one handled again (a retried record gives the same output)."""
    while True:
        try:
            handler.handle(event, record)
            return
        except PoisonRecordError as e:
            if e.record is None or e.record == record:
                raise
            reject(e.record, e)


def flush_rejecting(handler: Handler, reject: Reject) -> None:
    """`handler.flush` if it has one; a record the flush names as poison is rejected and
    the rest flushed again."""
    while isinstance(handler, Flushing):
        try:
            handler.flush()
            return
        except PoisonRecordError as e:
            if e.record is None:
                raise
            reject(e.record, e)


def acknowledge_rejection(handler: Handler, error: PoisonRecordError) -> None:
    """Once a record a flush rejected is dead-lettered, tell the handler to forget it."""
    if error.record is not None and isinstance(handler, Rejecting):
        handler.dead_lettered(error.record)


def dead_letter(
    sink: RawSink,
    contract: Contract,
    service: str,
    record: Record,
    reason: str,
    error_type: str,
) -> None:
    """Send a record's bytes and the reason to the dead-letter stream, or stop the service
    (`ConfigurationFault`) if the dead-letter stream refuses it too."""
    letter = DeadLetter(
        service=service,
        source_stream=record.stream,
        shard_id=record.shard_id,
        sequence_number=record.sequence_number,
        partition_key=record.partition_key,
        reason=reason,
        error_type=error_type,
        failed_at_ms=now_ms(),
        data=bytes(record.data),
    )
    log.error(
        "dead-lettered record %s: %s",
        record.sequence_number,
        reason,
        extra={"shard_id": record.shard_id, "stream": record.stream},
    )
    try:
        sink.put_raw([(record.partition_key, contract.encode(letter))])
    except PoisonRecordError as e:  # neither processable nor storable: an operator decides
        raise ConfigurationFault(
            f"dead letter of {record.stream}/{record.shard_id}/{record.sequence_number} "
            f"refused by {sink.stream}: {e.reason}"
        ) from e


class _ShardPaused(Exception):
    """`_handle` found a record this consumer cannot read yet. Not a RetryableError:
    `_retrying` would retry it in place, holding every shard."""

    def __init__(self, error: UnknownWriterSchema) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Stuck:
    """Where a shard waits, how often it was retried, and when it is next."""

    sequence_number: str
    attempts: int
    retry_at: float | None  # None: re-read, waiting for the record to come again


class ShardPauses:
    """Shards stopped at a record whose writer schema this consumer lacks.

    Holds no records: a paused shard's later records are dropped as they are
    polled, and the shard is read again from the stuck record once its backoff
    (`base_s`, doubling, at most `cap_s`) is over. A shard counts as paused
    (`len`) from the pause until that record is handled or the shard is lost.
    """

    def __init__(
        self, base_s: float = 1.0, cap_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.clock = clock
        self._stuck: dict[str, _Stuck] = {}

    def holds_back(self, shard_id: str, sequence_number: str) -> bool:
        """True if this record must wait: its shard is paused, or was read again but this
        record comes after the stuck one (the rewind did not take: pause again)."""
        stuck = self._stuck.get(shard_id)
        if stuck is None:
            return False
        if stuck.retry_at is not None:
            return True
        if int(sequence_number) > int(stuck.sequence_number):
            self.pause(shard_id, stuck.sequence_number)
            return True
        return False

    def __len__(self) -> int:
        """Shards stuck behind a record, paused or being read again."""
        return len(self._stuck)

    def pause(self, shard_id: str, sequence_number: str) -> float:
        """Stop the shard at this record; the seconds until it is retried."""
        stuck = self._stuck.get(shard_id)
        again = stuck is not None and stuck.sequence_number == sequence_number
        attempts = stuck.attempts + 1 if stuck is not None and again else 0
        delay = min(self.cap_s, self.base_s * 2 ** min(attempts, 16))
        self._stuck[shard_id] = _Stuck(sequence_number, attempts, self.clock() + delay)
        return delay

    def due(self) -> list[tuple[str, str]]:
        """(shard, stuck record) of every paused shard whose retry time has come."""
        now = self.clock()
        return [
            (shard_id, stuck.sequence_number)
            for shard_id, stuck in self._stuck.items()
            if stuck.retry_at is not None and stuck.retry_at <= now
        ]

    def resumed(self, shard_id: str) -> None:
        """The source reads the shard again from the stuck record."""
        self._stuck[shard_id].retry_at = None

    def passed(self, shard_id: str, sequence_number: str) -> None:
        """A record of the shard was handled: the shard is no longer stuck behind it."""
        stuck = self._stuck.get(shard_id)
        if stuck is not None and int(sequence_number) >= int(stuck.sequence_number):
            del self._stuck[shard_id]

    def drop(self, shard_id: str) -> None:
        """Another instance owns the shard now."""
        self._stuck.pop(shard_id, None)
