"""The persister's DynamoDB adapter: the transcript tables' writes, errors classified where
they enter (`callstream.awserrors`): throttling and 5xx retry, a configuration fault stops."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream.awserrors import classify
from callstream.errors import RetryableError
from services.persister.core import PutRow

log = logging.getLogger(__name__)
BatchRequests = dict[str, list[dict[str, Any]]]  # table -> [{"PutRequest": {"Item": ...}}]


class TranscriptTables:
    """BatchWriteItem, PutItem and the conditional put of a partial over a boto3 resource."""

    def __init__(self, dynamodb: Any) -> None:
        self.dynamodb = dynamodb

    def batch_attempt(self, requests: BatchRequests) -> BatchRequests:
        """One BatchWriteItem; what is left to write (all of it after a retryable error)."""
        client = self.dynamodb.meta.client
        try:
            response = client.batch_write_item(RequestItems=requests)
        except (ClientError, BotoCoreError) as e:
            error = classify(e, what=f"DynamoDB batch write to {', '.join(requests)}")
            if not isinstance(error, RetryableError):
                raise error from e
            log.warning("batch_write_item retried: %s", error)
            return requests
        unprocessed: BatchRequests = response.get("UnprocessedItems") or {}
        if unprocessed:
            log.info("retrying %d unprocessed rows", sum(len(v) for v in unprocessed.values()))
        return unprocessed

    def put(self, table: str, item: dict[str, Any], what: str) -> None:
        """One PutItem; raises the classified error (`what` names the row)."""
        try:
            self.dynamodb.meta.client.put_item(TableName=table, Item=item)
        except (ClientError, BotoCoreError) as e:
            raise classify(e, what=what) from e

    def put_row(self, row: PutRow) -> None:
        """A row's PutItem; a partial only where no final stands (a stale one is dropped)."""
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
            raise classify(e, what=f"DynamoDB put to {row.table}") from e
        except BotoCoreError as e:
            raise classify(e, what=f"DynamoDB put to {row.table}") from e


def ensure_tables(dynamodb_client: Any, names: Iterable[str]) -> None:
    """Create the transcript tables (reference key schema, TTL) where missing."""
    for name in names:
        aws.ensure_table(
            dynamodb_client, name, ("ContactId", "S"), ("StartTime", "N"), "ExpiresAfter"
        )
