"""Shard leases and checkpoints in a DynamoDB table, in the manner of the KCL.

One item per (application, stream, shard), keyed `<application>/<stream>/<shard>`
so two applications or two streams never share a checkpoint: `owner`,
`expires_at_ms` (renewed by the owner's heartbeat), `counter` (bumped on every
change; every write is conditional on the counter the writer last saw, so two
instances racing for a lease cannot both win, and every write but a take also
on the owner it saw, so only the holder writes a checkpoint), the checkpoint (`checkpoint`,
`checkpoint_inclusive`), `drained` (a closed shard read to its end) and
`finished` (its every record done). An instance takes free or expired leases
up to its fair share (shards divided by the live owners it can see), so
instances spread out and take over a dead one's shards once its leases expire.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from callstream import aws
from callstream.clock import now_ms

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """A shard lease as this instance last saw it."""

    key: str
    shard_id: str
    owner: str | None
    expires_at_ms: int
    counter: int
    checkpoint: str | None
    checkpoint_inclusive: bool
    finished: bool = False
    drained: bool = False


class LeaseTable:
    """Reads and conditionally writes lease items."""

    def __init__(self, client: Any, table: str) -> None:
        self.client = client
        self.table = table

    def ensure_table(self) -> None:
        """Create the table if absent; many instances starting at once may race to create it."""
        aws.ensure_table(self.client, self.table, ("lease_key", "S"))

    def scan(self, prefix: str) -> list[Lease]:
        """All leases of one application and stream."""
        leases: list[Lease] = []
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "FilterExpression": "begins_with(lease_key, :p)",
            "ExpressionAttributeValues": {":p": {"S": prefix}},
            "ConsistentRead": True,
        }
        while True:
            page = self.client.scan(**kwargs)
            leases.extend(_lease_of(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return leases
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def create(self, key: str, shard_id: str) -> None:
        """Add a lease for a new shard; no-op if it exists."""
        try:
            self.client.put_item(
                TableName=self.table,
                Item={
                    "lease_key": {"S": key},
                    "shard_id": {"S": shard_id},
                    "counter": {"N": "0"},
                    "expires_at_ms": {"N": "0"},
                },
                ConditionExpression="attribute_not_exists(lease_key)",
            )
        except ClientError as e:
            if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def take(self, lease: Lease, owner: str, duration_ms: int) -> bool:
        """Claim or renew a lease if nobody changed it since we read it."""
        return self._update(
            lease,
            "SET #o = :o, expires_at_ms = :e, #c = :n",
            {":o": {"S": owner}, ":e": {"N": str(now_ms() + duration_ms)}},
            held=False,
        )

    def release(self, lease: Lease) -> bool:
        """Give a lease up so another instance can take it now."""
        return self._update(lease, "SET expires_at_ms = :e, #c = :n REMOVE #o", {":e": {"N": "0"}})

    def set_checkpoint(
        self, lease: Lease, sequence: str, inclusive: bool, finished: bool = False
    ) -> bool:
        """Store a checkpoint, only while we still own the lease."""
        return self._update(
            lease,
            "SET checkpoint = :s, checkpoint_inclusive = :i, finished = :f, #c = :n",
            {":s": {"S": sequence}, ":i": {"BOOL": inclusive}, ":f": {"BOOL": finished}},
        )

    def mark_drained(self, lease: Lease) -> bool:
        """Note that a closed shard was read to its end (its children may follow)."""
        return self._update(lease, "SET drained = :d, #c = :n", {":d": {"BOOL": True}})

    def _update(
        self, lease: Lease, expression: str, values: dict[str, Any], held: bool = True
    ) -> bool:
        """Write if nobody changed the lease since we read it (and, if `held`, we own it)."""
        values = {**values, ":old": {"N": str(lease.counter)}, ":n": {"N": str(lease.counter + 1)}}
        names = {"#c": "counter"}
        condition = "#c = :old"
        if held:  # the counter alone would do; the owner guards against a recreated item too
            if lease.owner is None:
                return False
            condition += " AND #o = :me"
            values[":me"] = {"S": lease.owner}
        if held or "#o" in expression:
            names["#o"] = "owner"
        try:
            response = self.client.update_item(
                TableName=self.table,
                Key={"lease_key": {"S": lease.key}},
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
            )
        except ClientError as e:
            if e.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        fresh = _lease_of(response["Attributes"])
        lease.__dict__.update(fresh.__dict__)
        return True


def lease_client(region: str, lease_ms: int) -> Any:
    """A DynamoDB client for the lease table: a request answers well within a lease, or fails.

    The project's default client retries adaptively 8 times with a 30 s read
    timeout; one hung renewal would then outlive the lease. Here two attempts
    of at most a third of a lease each (1..5 s): a failed renewal is retried by
    the next heartbeat, and a lease not renewed in time is fenced (`consumer.py`).
    """
    read_s = min(5.0, max(1.0, lease_ms / 3000))
    return aws.client(
        "dynamodb",
        region,
        retries={"mode": "standard", "total_max_attempts": 2},
        connect_timeout=min(2.0, read_s),
        read_timeout=read_s,
    )


def fair_share(shard_count: int, live_owners: int) -> int:
    """How many shards one of `live_owners` instances should hold."""
    return max(1, math.ceil(shard_count / max(1, live_owners)))


def _lease_of(item: dict[str, Any]) -> Lease:
    return Lease(
        key=item["lease_key"]["S"],
        shard_id=item["shard_id"]["S"],
        owner=item.get("owner", {}).get("S"),
        expires_at_ms=int(item.get("expires_at_ms", {}).get("N", "0")),
        counter=int(item.get("counter", {}).get("N", "0")),
        checkpoint=item.get("checkpoint", {}).get("S"),
        checkpoint_inclusive=bool(item.get("checkpoint_inclusive", {}).get("BOOL", False)),
        finished=bool(item.get("finished", {}).get("BOOL", False)),
        drained=bool(item.get("drained", {}).get("BOOL", False)),
    )
