"""Durable per-call progress: where a service resumes a call after a takeover.

A shard checkpoint is one position for many interleaved calls, so it cannot
say how far each call got. A service that must not redo a call's work after a
takeover (ingest: the fragments it already published; transcriber: the audio
before its last final) saves a small state per call here, after the effects
it describes are durable, and loads it when it meets a call it does not hold
in memory.

Items live in their own DynamoDB table (`CALLSTREAM_PROGRESS_TABLE`), one per
(service, contact): `progress_key = "<service>/<contact_id>"`, the state as
JSON, a `version` that only grows, and `expires_at_s` for DynamoDB's TTL (a
call's progress is useless a day after it ended). Not in the lease table:
every instance scans that one on every heartbeat.

Saves are conditional on a higher version, so an instance that lost the call
(its lease was stolen, it has not noticed yet) cannot move the progress back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from callstream.aws import ensure_table
from callstream.errors import RetryableError

log = logging.getLogger(__name__)

TTL_ATTRIBUTE = "expires_at_s"
DEFAULT_RETENTION_S = 2 * 24 * 3600


class ProgressStore(Protocol):
    """Per-call progress of one service."""

    def load(self, contact_id: str) -> dict[str, Any] | None:
        """The last saved state of this call, or None."""

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        """Store `state` unless a state with `version` or higher is stored; True if stored."""


class DynamoProgress:
    """A `ProgressStore` in a DynamoDB table shared by every service."""

    def __init__(
        self,
        client: Any,
        table: str,
        service: str,
        retention_s: int = DEFAULT_RETENTION_S,
        create: bool = True,
    ) -> None:
        self.client = client
        self.table = table
        self.service = service
        self.retention_s = retention_s
        if create:
            ensure_table(client, table, ("progress_key", "S"), ttl_attribute=TTL_ATTRIBUTE)

    def load(self, contact_id: str) -> dict[str, Any] | None:
        try:
            item = self.client.get_item(
                TableName=self.table,
                Key={"progress_key": {"S": self._key(contact_id)}},
                ConsistentRead=True,
            ).get("Item")
        except (ClientError, BotoCoreError) as e:
            raise RetryableError(f"cannot read progress of {contact_id}: {e}") from e
        if item is None:
            return None
        state: dict[str, Any] = json.loads(item["state"]["S"])
        return state

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        try:
            self.client.put_item(
                TableName=self.table,
                Item={
                    "progress_key": {"S": self._key(contact_id)},
                    "state": {"S": json.dumps(state, separators=(",", ":"))},
                    "version": {"N": str(version)},
                    TTL_ATTRIBUTE: {"N": str(int(time.time()) + self.retention_s)},
                },
                ConditionExpression="attribute_not_exists(progress_key) OR version < :v",
                ExpressionAttributeValues={":v": {"N": str(version)}},
            )
        except ClientError as e:
            if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise RetryableError(f"cannot save progress of {contact_id}: {e}") from e
        except BotoCoreError as e:
            raise RetryableError(f"cannot save progress of {contact_id}: {e}") from e
        return True

    def _key(self, contact_id: str) -> str:
        return f"{self.service}/{contact_id}"


class MemoryProgress:
    """The in-memory twin, for unit tests (same conditional semantics)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[int, str]] = {}
        self.saves = 0
        self._lock = threading.Lock()

    def load(self, contact_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self.items.get(contact_id)
        return None if item is None else dict(json.loads(item[1]))

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        with self._lock:
            stored = self.items.get(contact_id)
            if stored is not None and stored[0] >= version:
                return False
            self.items[contact_id] = (version, json.dumps(state))
            self.saves += 1
            return True
