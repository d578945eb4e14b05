"""The persister's handler: the rows of each transcript segment, stored before the checkpoint.

Finals are buffered and written with BatchWriteItem (25 per request;
UnprocessedItems retried with jittered backoff); a call with buffered rows is
unsettled, and the loop flushes before every checkpoint, so a record is
checkpointed only once its row is stored. Partials keep their conditional
PutItem (never over a final), written at once: a final buffered behind them
overwrites them when flushed.

DynamoDB errors are classified where they enter (`adapters.TranscriptTables`):
throttling and 5xx back off and retry, a configuration fault (the table
missing, access denied) stops the service. A row DynamoDB refuses (over its
400 KB item limit, a value it rejects) fails the whole BatchWriteItem; the
batch is then written row by row to find it, and the flush raises
`PoisonRecordError` naming the record it came from. That call stays unsettled
until the loop has stored the dead letter (`dead_lettered`, see
`callstream.runtime.Rejecting`); the other rows are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from callstream.bus.ports import Record
from callstream.clock import backoff_delays
from callstream.errors import PoisonRecordError, StoreUnavailable
from callstream.events import Event, TranscriptSegmentProduced
from services.persister.adapters import BatchRequests, TranscriptTables
from services.persister.core import RowPolicy, rows_for
from services.persister.settings import PersisterSettings

log = logging.getLogger(__name__)
RowKey = tuple[str, str, Any]  # (table, ContactId, StartTime)
BATCH_ITEMS = 25  # the BatchWriteItem limit
FLUSH_AT = 100  # buffered finals that trigger a flush within a batch of records


class PersisterHandler:
    """Writes the rows of each segment."""

    def __init__(
        self,
        settings: PersisterSettings,
        dynamodb: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.tables = TranscriptTables(dynamodb)
        self.clock = clock  # LoggedOn and ExpiresAfter of the rows
        self.policy = RowPolicy(
            settings.customer_table, settings.agent_table, settings.save_partials, settings.ttl_days
        )
        self.deadline_s = 120.0
        # (table, contact, start) -> item; a later final for the same key replaces an earlier one
        self._pending: dict[RowKey, dict[str, Any]] = {}
        self._sources: dict[RowKey, Record] = {}  # the record each pending row came from
        self._rejected: dict[RowKey, tuple[Record, str]] = {}  # refused rows, dead letter owed

    def handle(self, event: Event, record: Record) -> None:
        if self.settings.console_log and isinstance(event, TranscriptSegmentProduced):
            log.info(
                "%s %s: %s",
                "partial" if event.is_partial else "final",
                event.track.speaker,
                event.transcript,
                extra={"contact_id": event.contact_id, "track": event.track.value},
            )
        for row in rows_for(event, self.policy, int(self.clock() * 1000)):
            if row.only_over_partial:
                self.tables.put_row(row)
            else:
                key = (row.table, row.item["ContactId"], row.item["StartTime"])
                self._pending[key] = row.item
                self._sources[key] = record
        if len(self._pending) >= FLUSH_AT:
            self.flush()

    def is_settled(self, contact_id: str) -> bool:
        return not any(key[1] == contact_id for key in (*self._pending, *self._rejected))

    def flush(self) -> None:
        """Write every buffered final with BatchWriteItem.

        Raises StoreUnavailable past the deadline, ConfigurationFault at once, and
        PoisonRecordError naming the record of a row DynamoDB refuses (again at
        every flush until `dead_lettered`)."""
        for record, reason in self._rejected.values():
            raise PoisonRecordError(reason, record)
        while self._pending:
            keys = list(self._pending)[:BATCH_ITEMS]
            requests: BatchRequests = {}
            for key in keys:
                requests.setdefault(key[0], []).append({"PutRequest": {"Item": self._pending[key]}})
            try:
                self._batch_write(requests)
            except PoisonRecordError:  # one row spoils the batch: find it
                self._write_singly(keys)
            for key in keys:
                self._pending.pop(key, None)
                self._sources.pop(key, None)

    def dead_lettered(self, record: Record) -> None:
        """The loop stored the dead letter of a record whose row was refused."""
        for key in [k for k, (source, _) in self._rejected.items() if source == record]:
            del self._rejected[key]

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None

    def _batch_write(self, requests: BatchRequests) -> None:
        """One BatchWriteItem, then its UnprocessedItems again with backoff, until the deadline."""
        deadline = time.monotonic() + self.deadline_s
        delays: Iterator[float] = backoff_delays(base_s=0.05, cap_s=2.0)
        while requests:
            requests = self.tables.batch_attempt(requests)
            if not requests:
                return
            if time.monotonic() > deadline:
                count = sum(len(items) for items in requests.values())
                raise StoreUnavailable(f"{count} rows not accepted by DynamoDB in time")
            time.sleep(next(delays))

    def _write_singly(self, keys: list[RowKey]) -> None:
        """Write a refused batch row by row; the row DynamoDB refuses is rejected and raised."""
        for key in keys:
            try:
                self.tables.put(
                    key[0], self._pending[key], f"DynamoDB put to {key[0]} of {key[1]} at {key[2]}"
                )
            except PoisonRecordError as error:
                if self._sources.get(key) is None:
                    raise
                record = self._sources.pop(key)
                del self._pending[key]
                self._rejected[key] = (record, error.reason)
                raise PoisonRecordError(error.reason, record) from error.__cause__
            del self._pending[key]
            self._sources.pop(key, None)
