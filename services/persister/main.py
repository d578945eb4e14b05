"""Persister service: the transcripts stream -> DynamoDB rows.

Thin wiring over `core.rows_for`. Every row is written before its record is
checkpointed, so each call is settled as soon as its record is handled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream import log as logsetup
from callstream.bus.ports import Record
from callstream.config import PersisterSettings
from callstream.errors import StoreUnavailable
from callstream.events import Event, TranscriptSegmentProduced
from callstream.service import load_settings, run_service
from services.persister.core import PutRow, RowPolicy, rows_for

log = logging.getLogger(__name__)


class PersisterHandler:
    """Writes the rows of each segment."""

    def __init__(self, settings: PersisterSettings, dynamodb: Any) -> None:
        self.settings = settings
        self.dynamodb = dynamodb
        self.policy = RowPolicy(
            settings.customer_table, settings.agent_table, settings.save_partials, settings.ttl_days
        )

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
            self._put(row)

    def is_settled(self, contact_id: str) -> bool:
        return True

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None

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
        try:
            dynamodb_client.create_table(
                TableName=name,
                KeySchema=[
                    {"AttributeName": "ContactId", "KeyType": "HASH"},
                    {"AttributeName": "StartTime", "KeyType": "RANGE"},
                ],
                AttributeDefinitions=[
                    {"AttributeName": "ContactId", "AttributeType": "S"},
                    {"AttributeName": "StartTime", "AttributeType": "N"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
            dynamodb_client.get_waiter("table_exists").wait(TableName=name)
            dynamodb_client.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ExpiresAfter"},
            )
        except dynamodb_client.exceptions.ResourceInUseException:
            pass


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
