"""Kinesis Data Streams producer: framed Avro records via PutRecords, in order per key.

PutRecords fails entry by entry (a shard over its 1 MiB/s or 1,000
records/s, an internal error) and goes on with the entries after a failed
one, so a request carrying two records of one partition key can store the
later and refuse the earlier: retrying only the failed entries, as this
publisher once did, stores a call's chunk after the one that followed it.
AWS documents it ("PutRecords doesn't guarantee the ordering of records").

So a request never carries more than one record of a partition key, and a
key's next record is sent only once the one before it is stored: each
*round* sends the oldest unsent record of every key with records waiting
(up to 500 records and 5 MiB per request), keeps the stored ones and
retries the refused ones in a later round. Records of one key are stored in
the order they were published, with no gap and no repeat; records of
different keys share every request. The alternative, resending a key from
its first failed entry on, stores the later records twice and still puts a
copy of a later one before the earlier: measured and discussed in
docs/capacity.md ("The producer").

One publisher serves every thread of a process (ingest runs one session
per call): a caller's records join a shared queue per key and whichever
caller finds no round in flight sends the next one, for everyone; the
others wait for their own records. So the number of requests per second is
about the records per second of the busiest key (16 for a call's audio),
however many calls the process runs, and the CPU per record stays that of a
full request. A key refused for throughput waits before its next attempt
(full-jitter exponential backoff from 50 ms to 2 s, reset when one of its
records is stored), while keys on other shards go on: the publisher paces
itself to each shard's write quota without knowing the shard map.

Nothing is dropped silently. A publish one of whose records is refused
after `deadline_s` raises `StoreUnavailable` (the caller does not
checkpoint, so its input is replayed; a deadline of 0 gives up at the first
refusal), and so does every publish queued behind it on one of its keys
(sending those would put them before the missing record); the error then
says which of the caller's records were stored (`errors.stored_of`), so it
resends only the others and the stream carries no repeats. Errors no retry
mends are raised at once, classified by `callstream.awserrors`:
`ConfigurationFault` (a missing stream, access denied, the stream's KMS key
denied or disabled, also as a per-entry error code) or `PoisonRecordError`
(a record Kinesis refuses).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import Outcome, classify, outcome_of_code
from callstream.contract import Contract, default_contract
from callstream.errors import (
    CallstreamError,
    ConfigurationFault,
    RetryableError,
    StoreUnavailable,
    partly_published,
)
from callstream.events import Event, partition_key

log = logging.getLogger(__name__)

MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0


@dataclass(eq=False)
class _Publish:
    """One caller's records not yet stored (in its order), by when, and how it ended."""

    entries: deque[_Entry]
    deadline: float
    error: CallstreamError | None = None


@dataclass(eq=False)
class _Entry:
    key: str
    data: bytes
    publish: _Publish | None = None
    stored: bool = False


@dataclass
class _Key:
    """A partition key's records not yet stored, oldest first, and its backoff."""

    entries: deque[_Entry] = field(default_factory=deque)
    not_before: float = 0.0
    throttles: int = 0


class KinesisPublisher:
    """Publishes events (or raw framed bytes) to one stream, in order per partition key."""

    def __init__(
        self,
        client: Any,
        stream: str,
        contract: Contract | None = None,
        deadline_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.stream = stream
        self.contract = contract or default_contract()
        self.deadline_s = deadline_s
        self.clock = clock
        self.requests = 0  # PutRecords sent (for benchmarks)
        self._cond = threading.Condition()  # guards what follows
        self._keys: dict[str, _Key] = {}
        self._publishes: dict[_Publish, None] = {}  # unfinished, oldest first
        self._sending = False
        self._log_extra = {"stream": stream}

    def publish(self, events: Sequence[Event]) -> None:
        """Encode and publish events; raises StoreUnavailable past the deadline."""
        self.put_raw([(partition_key(e), self.contract.encode(e)) for e in events])

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish (partition key, framed bytes) pairs; returns once every one is stored."""
        if not items:
            return
        entries = [_Entry(key, data) for key, data in items]
        mine = _Publish(deque(entries), self.clock() + self.deadline_s)
        with self._cond:
            for entry in entries:
                entry.publish = mine
                self._keys.setdefault(entry.key, _Key()).entries.append(entry)
            self._publishes[mine] = None
            self._cond.notify_all()
        while True:
            with self._cond:
                while mine.entries and mine.error is None and self._sending:
                    self._cond.wait()
                if mine.error is not None:
                    stored = [entry.stored for entry in entries]
                    raise partly_published(mine.error, stored) if any(stored) else mine.error
                if not mine.entries:
                    return
                self._sending = True
            try:
                self._round()
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    # --- rounds -------------------------------------------------------------
    def _round(self) -> None:
        """Send the next records that may go (or wait until one may)."""
        with self._cond:
            now = self.clock()
            ready = self._ready(now)
            if not ready:
                waits = [k.not_before - now for k in self._keys.values() if k.entries]
                if waits:  # woken early when a caller adds records (perhaps of a ready key)
                    self._cond.wait(max(0.0, min(waits)))
                return
        for batch in _batches(ready):
            with self._cond:  # a publish failed by an earlier batch of this round is not sent
                batch = [entry for entry in batch if not _failed(entry)]
            if batch:
                self._send(batch)

    def _ready(self, now: float) -> list[_Entry]:
        """Per publish, oldest first: its unsent records in its order while each is the oldest
        of its key, that key is not backing off, and no earlier one in this round has it.
        So a key has one record in flight, and a publish that meets no refusal is stored in
        its own order, as one PutRecords of it would be."""
        ready: list[_Entry] = []
        taken: set[str] = set()
        for publish in self._publishes:
            for entry in publish.entries:
                if entry.stored:
                    continue
                key = self._keys[entry.key]
                if entry.key in taken or key.entries[0] is not entry or key.not_before > now:
                    break
                ready.append(entry)
                taken.add(entry.key)
        return ready

    def _send(self, batch: list[_Entry]) -> None:
        entries = [{"PartitionKey": entry.key, "Data": entry.data} for entry in batch]
        self.requests += 1
        try:
            response = self.client.put_records(StreamName=self.stream, Records=entries)
        except (ClientError, BotoCoreError) as e:
            error = classify(e, what=f"put_records to {self.stream}")
            with self._cond:
                if isinstance(error, RetryableError):
                    log.warning("put_records retried: %s", error, extra=self._log_extra)
                    for entry in batch:
                        self._refused(entry)
                else:
                    for entry in batch:
                        self._fail(entry, error)
            return
        results = response["Records"] if response.get("FailedRecordCount") else [{}] * len(batch)
        with self._cond:
            refused = 0
            for entry, result in zip(batch, results, strict=True):
                code = result.get("ErrorCode")
                if not code:
                    self._stored(entry)
                elif outcome_of_code(code) is Outcome.STOP:
                    message = result.get("ErrorMessage", "")
                    fault = ConfigurationFault(
                        f"put_records to {self.stream} failed: {code}: {message}"
                    )
                    self._fail(entry, fault)
                else:  # throughput, internal errors, unknown codes: retried, as AWS advises
                    refused += 1
                    self._refused(entry)
        if refused:
            log.info("%d of %d records refused", refused, len(batch), extra=self._log_extra)

    def _stored(self, entry: _Entry) -> None:
        key = self._keys.get(entry.key)
        publish = entry.publish
        if key is None or not key.entries or key.entries[0] is not entry or publish is None:
            return  # its publish failed meanwhile (deadline, a fault): its caller publishes again
        key.entries.popleft()
        key.throttles = 0
        key.not_before = 0.0
        if not key.entries:
            del self._keys[entry.key]
        entry.stored = True
        while publish.entries and publish.entries[0].stored:
            publish.entries.popleft()
        if not publish.entries:
            self._publishes.pop(publish, None)

    def _refused(self, entry: _Entry) -> None:
        """A refused record waits for its key's backoff; past its publish's deadline (checked
        only on a refusal, so a deadline of 0 means "give up at the first one") the publish
        fails."""
        key = self._keys.get(entry.key)
        publish = entry.publish
        if key is None or publish is None:
            return
        now = self.clock()
        if publish.deadline <= now:
            unstored = sum(1 for e in publish.entries if not e.stored)
            error = StoreUnavailable(
                f"{unstored} records not accepted by stream {self.stream} "
                f"within {self.deadline_s:.0f} s"
            )
            self._fail(entry, error)
            return
        key.throttles += 1
        delay = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (key.throttles - 1)))
        key.not_before = now + delay

    # --- failures -----------------------------------------------------------

    def _fail(self, entry: _Entry, error: CallstreamError) -> None:
        """End the publish of `entry` with `error`, and every publish queued behind it on one
        of its keys: their records would otherwise be stored before its missing one."""
        work = [(entry.publish, error)]
        while work:
            failed, reason = work.pop()
            if failed is None or failed not in self._publishes:
                continue
            failed.error = failed.error or reason
            del self._publishes[failed]
            for mine in failed.entries:
                key = self._keys.get(mine.key)
                if mine.stored or key is None or mine not in key.entries:
                    continue
                queued = list(key.entries)
                at = queued.index(mine)
                key.entries = deque(queued[:at])
                for later in queued[at + 1 :]:
                    work.append((later.publish, _behind(self.stream, mine.key, reason)))
                if not key.entries:
                    del self._keys[mine.key]
        self._cond.notify_all()


def _failed(entry: _Entry) -> bool:
    return entry.publish is None or entry.publish.error is not None


def _behind(stream: str, key: str, cause: CallstreamError) -> StoreUnavailable:
    return StoreUnavailable(
        f"not published to {stream}: an earlier record of partition key {key} was not "
        f"stored ({cause})"
    )


def _batches(entries: Sequence[_Entry]) -> list[list[_Entry]]:
    batches: list[list[_Entry]] = []
    current: list[_Entry] = []
    size = 0
    for entry in entries:
        item_size = len(entry.key.encode()) + len(entry.data)
        if current and (len(current) >= MAX_BATCH_RECORDS or size + item_size > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(entry)
        size += item_size
    if current:
        batches.append(current)
    return batches
