"""Persister service: the transcripts stream -> DynamoDB rows.

Thin wiring over `core.rows_for`. Finals are buffered and written with
BatchWriteItem (25 per request; UnprocessedItems retried with jittered
backoff); a call with buffered rows is unsettled, and the loop flushes before
every checkpoint, so a record is checkpointed only once its row is stored.
Partials keep their conditional PutItem (never over a final), written at
once: a final buffered behind them overwrites them when flushed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream import log as logsetup
from callstream.bus.kinesis import backoff_delays
from callstream.bus.ports import Record
from callstream.config import PersisterSettings
from callstream.errors import StoreUnavailable
from callstream.events import Event, TranscriptSegmentProduced
from callstream.service import load_settings, run_service
from services.persister.core import PutRow, RowPolicy, rows_for

log = logging.getLogger(__name__)
BATCH_ITEMS = 25  # the BatchWriteItem limit
FLUSH_AT = 100  # buffered finals that trigger a flush within a batch of records
_THROTTLED = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
}


class PersisterHandler:
    """Writes the rows of each segment."""

    def __init__(self, settings: PersisterSettings, dynamodb: Any) -> None:
        self.settings = settings
        self.dynamodb = dynamodb
        self.policy = RowPolicy(
            settings.customer_table, settings.agent_table, settings.save_partials, settings.ttl_days
        )
        self.deadline_s = 120.0
        # (table, contact, start) -> item; a later final for the same key replaces an earlier one
        self._pending: dict[tuple[str, str, Any], dict[str, Any]] = {}

    def handle(self, event: Event, record: Record) -> None:
        if self.settings.console_log and isinstance(event, TranscriptSegmentProduced):
            log.info(
                "%s %s: %s",
                "partial" if event.is_partial else "final",
                event.track.speaker,
                event.transcript,
                extra={"contact_id": event.contact_id, "track": event.track.value},
            )
        for row in rows_for(event, self.policy, int(time.time() * 1000)):
            if row.only_over_partial:
                self._put(row)
            else:
                key = (row.table, row.item["ContactId"], row.item["StartTime"])
                self._pending[key] = row.item
        if len(self._pending) >= FLUSH_AT:
            self.flush()

    def is_settled(self, contact_id: str) -> bool:
        return not any(key[1] == contact_id for key in self._pending)

    def flush(self) -> None:
        """Write every buffered final with BatchWriteItem; raise StoreUnavailable if it cannot."""
        while self._pending:
            keys = list(self._pending)[:BATCH_ITEMS]
            requests: dict[str, list[dict[str, Any]]] = {}
            for key in keys:
                requests.setdefault(key[0], []).append({"PutRequest": {"Item": self._pending[key]}})
            self._batch_write(requests)
            for key in keys:
                del self._pending[key]

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None

    def _batch_write(self, requests: dict[str, list[dict[str, Any]]]) -> None:
        """One BatchWriteItem, then its UnprocessedItems again with backoff, until the deadline."""
        deadline = time.monotonic() + self.deadline_s
        delays: Iterator[float] = backoff_delays(base_s=0.05, cap_s=2.0)
        while requests:
            requests = self._batch_attempt(requests)
            if not requests:
                return
            if time.monotonic() > deadline:
                count = sum(len(items) for items in requests.values())
                raise StoreUnavailable(f"{count} rows not accepted by DynamoDB in time")
            time.sleep(next(delays))

    def _batch_attempt(
        self, requests: dict[str, list[dict[str, Any]]]
    ) -> dict[str, list[dict[str, Any]]]:
        client = self.dynamodb.meta.client
        try:
            response = client.batch_write_item(RequestItems=requests)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in _THROTTLED:
                log.warning("batch_write_item throttled: %s", code)
                return requests
            raise StoreUnavailable(f"DynamoDB batch write failed: {e}") from e
        except BotoCoreError as e:
            log.warning("batch_write_item: %s", e)
            return requests
        unprocessed: dict[str, list[dict[str, Any]]] = response.get("UnprocessedItems") or {}
        if unprocessed:
            log.info("retrying %d unprocessed rows", sum(len(v) for v in unprocessed.values()))
        return unprocessed

    def _put(self, row: PutRow) -> None:
        table = self.dynamodb.Table(row.table)
        kwargs: dict[str, Any] = {"Item": row.item}
        if row.only_over_partial:
            kwargs["ConditionExpression"] = "attribute_not_exists(ContactId) OR IsPartial = :p"
            kwargs["ExpressionAttributeValues"] = {":p": True}
        try:
            table.put_item(**kwargs)
        except ClientError as e:
            if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return  # a final already stands: the partial is stale
            raise StoreUnavailable(f"DynamoDB put to {row.table} failed: {e}") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"DynamoDB put to {row.table} failed: {e}") from e


def ensure_tables(dynamodb_client: Any, names: Iterable[str]) -> None:
    """Create the transcript tables (reference key schema, TTL) where missing."""
    for name in names:
        aws.ensure_table(
            dynamodb_client, name, ("ContactId", "S"), ("StartTime", "N"), "ExpiresAfter"
        )


def main() -> None:
    """Entry point: `python -m services.persister.main`."""
    logsetup.configure("persister")
    settings = load_settings(PersisterSettings.from_env)
    region = settings.bus.region
    ensure_tables(aws.client("dynamodb", region), [settings.customer_table, settings.agent_table])
    resource = aws.session(region).resource("dynamodb", config=aws.client_config())
    handler = PersisterHandler(settings, resource)
    run_service("persister", settings.bus, settings.bus.transcripts_stream, handler)


if __name__ == "__main__":
    main()
