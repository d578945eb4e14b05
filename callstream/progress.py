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

Ownership (optional, used by ingest): a call is worked on by one instance at
a time. The item then also carries `owner` (a worker id), `heartbeat_ms` and
`saved_at_ms` (wall-clock ms of the last state save, or of the first claim).
`claim` takes the call if it is free, released, already ours, or its owner's
heartbeat is older than the lease (DynamoDB checks that in the write's
condition, so two claimers cannot both win); `save_owned` and `heartbeat`
succeed only while the owner is still us; `release` gives it up. A claim
reports whether the previous owner left without releasing (it died, or lost
the call while working): what it did after its last save is then unknown to
the state, and the new owner must look for it. Heartbeat times are written
by the instances' clocks, so those must be roughly in sync (NTP), as for the
shard leases.

DynamoDB errors are classified where they enter (`callstream.awserrors`):
throttling and 5xx raise `StoreUnavailable` (a `RetryableError`), a missing
table or denied access `ConfigurationFault`, a state DynamoDB refuses (over
400 KB) `PoisonRecordError`. A failed condition is an answer, not an error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from callstream.aws import ensure_table
from callstream.awserrors import classify

log = logging.getLogger(__name__)

TTL_ATTRIBUTE = "expires_at_s"
DEFAULT_RETENTION_S = 2 * 24 * 3600


class ProgressStore(Protocol):
    """Per-call progress of one service."""

    def load(self, contact_id: str) -> dict[str, Any] | None:
        """The last saved state of this call, or None."""

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        """Store `state` unless a state with `version` or higher is stored; True if stored."""


@dataclass(frozen=True)
class Claim:
    """The answer to `claim`: granted or not, and what the progress item held."""

    granted: bool
    state: dict[str, Any] | None
    version: int
    holder: str | None = None  # the live owner that kept the call (not granted)
    unreleased: bool = False  # the previous owner left without releasing (granted)
    saved_at_ms: int = 0  # when `state` was saved (or the call first claimed)


class OwnedProgressStore(ProgressStore, Protocol):
    """Per-call progress with one owner at a time (see the module docstring)."""

    def claim(self, contact_id: str, owner: str, lease_ms: int) -> Claim:
        """Take the call if free, released, ours or its owner's heartbeat is stale."""

    def save_owned(self, contact_id: str, owner: str, state: dict[str, Any], version: int) -> bool:
        """`save`, only while `owner` still owns the call; also a heartbeat."""

    def heartbeat(self, contact_id: str, owner: str) -> bool:
        """Renew ownership; False if the call is no longer ours."""

    def release(self, contact_id: str, owner: str) -> bool:
        """Give the call up (after the last save); False if it was no longer ours."""


def _now_ms() -> int:
    return int(time.time() * 1000)


class DynamoProgress:
    """A `ProgressStore` in a DynamoDB table shared by every service."""

    def __init__(
        self,
        client: Any,
        table: str,
        service: str,
        retention_s: int = DEFAULT_RETENTION_S,
        create: bool = True,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.client = client
        self.table = table
        self.service = service
        self.retention_s = retention_s
        self.clock_ms = clock_ms
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
            raise classify(e, what=f"reading progress of {contact_id} from {self.table}") from e
        if item is None or "state" not in item:
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
            raise classify(e, what=f"saving progress of {contact_id} to {self.table}") from e
        except BotoCoreError as e:
            raise classify(e, what=f"saving progress of {contact_id} to {self.table}") from e
        return True

    # --- ownership ----------------------------------------------------------------
    def claim(self, contact_id: str, owner: str, lease_ms: int) -> Claim:
        item = self._get(contact_id)
        now = self.clock_ms()
        if item is None:
            granted = self._write(
                contact_id,
                "SET #o = :me, heartbeat_ms = :now, saved_at_ms = :now, version = :zero, "
                f"{TTL_ATTRIBUTE} = :ttl",
                "attribute_not_exists(progress_key)",
                {":me": {"S": owner}, ":now": _n(now), ":zero": _n(0), ":ttl": self._ttl()},
            )
            return Claim(granted, None, 0, saved_at_ms=now)
        state = json.loads(item["state"]["S"]) if "state" in item else None
        version = int(item.get("version", {}).get("N", "0"))
        holder = item.get("owner", {}).get("S")
        heartbeat = int(item.get("heartbeat_ms", {}).get("N", "0"))
        if holder not in (None, owner) and heartbeat + lease_ms > now:
            return Claim(False, state, version, holder=holder)
        granted = self._write(
            contact_id,
            f"SET #o = :me, heartbeat_ms = :now, {TTL_ATTRIBUTE} = :ttl",
            "version = :v AND (attribute_not_exists(#o) OR #o = :me OR heartbeat_ms < :stale)",
            {
                ":me": {"S": owner},
                ":now": _n(now),
                ":v": _n(version),
                ":stale": _n(now - lease_ms),
                ":ttl": self._ttl(),
            },
        )
        saved_at = int(item.get("saved_at_ms", {}).get("N", "0"))
        return Claim(granted, state, version, holder, holder is not None, saved_at)

    def save_owned(self, contact_id: str, owner: str, state: dict[str, Any], version: int) -> bool:
        now = self.clock_ms()
        return self._write(
            contact_id,
            "SET #s = :s, version = :v, heartbeat_ms = :now, saved_at_ms = :now, "
            f"{TTL_ATTRIBUTE} = :ttl",
            "#o = :me AND version < :v",
            {
                ":s": {"S": json.dumps(state, separators=(",", ":"))},
                ":v": _n(version),
                ":now": _n(now),
                ":me": {"S": owner},
                ":ttl": self._ttl(),
            },
        )

    def heartbeat(self, contact_id: str, owner: str) -> bool:
        return self._write(
            contact_id,
            "SET heartbeat_ms = :now",
            "#o = :me",
            {":now": _n(self.clock_ms()), ":me": {"S": owner}},
        )

    def release(self, contact_id: str, owner: str) -> bool:
        return self._write(
            contact_id,
            "REMOVE #o SET heartbeat_ms = :now",
            "#o = :me",
            {":now": _n(self.clock_ms()), ":me": {"S": owner}},
        )

    def _get(self, contact_id: str) -> dict[str, Any] | None:
        try:
            item: dict[str, Any] | None = self.client.get_item(
                TableName=self.table,
                Key={"progress_key": {"S": self._key(contact_id)}},
                ConsistentRead=True,
            ).get("Item")
        except (ClientError, BotoCoreError) as e:
            raise classify(e, what=f"reading progress of {contact_id} from {self.table}") from e
        return item

    def _write(self, contact_id: str, update: str, condition: str, values: dict[str, Any]) -> bool:
        """One conditional UpdateItem; False when the condition fails."""
        names = {n: a for n, a in (("#o", "owner"), ("#s", "state")) if n in update + condition}
        try:
            self.client.update_item(
                TableName=self.table,
                Key={"progress_key": {"S": self._key(contact_id)}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as e:
            if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise classify(e, what=f"writing progress of {contact_id} to {self.table}") from e
        except BotoCoreError as e:
            raise classify(e, what=f"writing progress of {contact_id} to {self.table}") from e
        return True

    def _ttl(self) -> dict[str, str]:
        return _n(int(time.time()) + self.retention_s)

    def _key(self, contact_id: str) -> str:
        return f"{self.service}/{contact_id}"


def _n(value: int) -> dict[str, str]:
    return {"N": str(value)}


class MemoryProgress:
    """The in-memory twin, for unit tests (same conditional semantics)."""

    def __init__(self, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.saves = 0
        self.writes = 0  # every successful write: saves, claims, heartbeats, releases
        self.clock_ms = clock_ms
        self._lock = threading.Lock()

    def load(self, contact_id: str) -> dict[str, Any] | None:
        with self._lock:
            item = self.items.get(contact_id)
        if item is None or item.get("state") is None:
            return None
        return dict(json.loads(item["state"]))

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        with self._lock:
            item = self.items.setdefault(contact_id, {"version": -1})
            if item["version"] >= version:
                return False
            item.update(version=version, state=json.dumps(state), saved_at_ms=self.clock_ms())
            self.saves += 1
            self.writes += 1
            return True

    def claim(self, contact_id: str, owner: str, lease_ms: int) -> Claim:
        with self._lock:
            now = self.clock_ms()
            item = self.items.get(contact_id)
            if item is None:
                self.items[contact_id] = {
                    "version": 0,
                    "owner": owner,
                    "heartbeat_ms": now,
                    "saved_at_ms": now,
                }
                self.writes += 1
                return Claim(True, None, 0, saved_at_ms=now)
            state = json.loads(item["state"]) if item.get("state") is not None else None
            holder = item.get("owner")
            if holder not in (None, owner) and item.get("heartbeat_ms", 0) + lease_ms > now:
                return Claim(False, state, item["version"], holder=holder)
            item.update(owner=owner, heartbeat_ms=now)
            self.writes += 1
            saved_at = item.get("saved_at_ms", 0)
            return Claim(True, state, item["version"], holder, holder is not None, saved_at)

    def save_owned(self, contact_id: str, owner: str, state: dict[str, Any], version: int) -> bool:
        with self._lock:
            item = self.items.get(contact_id)
            if item is None or item.get("owner") != owner or item["version"] >= version:
                return False
            now = self.clock_ms()
            item.update(version=version, state=json.dumps(state), heartbeat_ms=now, saved_at_ms=now)
            self.saves += 1
            self.writes += 1
            return True

    def heartbeat(self, contact_id: str, owner: str) -> bool:
        with self._lock:
            item = self.items.get(contact_id)
            if item is None or item.get("owner") != owner:
                return False
            item["heartbeat_ms"] = self.clock_ms()
            self.writes += 1
            return True

    def release(self, contact_id: str, owner: str) -> bool:
        with self._lock:
            item = self.items.get(contact_id)
            if item is None or item.get("owner") != owner:
                return False
            item.pop("owner")
            self.writes += 1
            return True
