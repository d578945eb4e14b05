"""What the audio stream already holds of one call: the reading that closes the crash window.

An owner that died may have published a call's events after its last saved
progress. Before resuming such a call, the new owner reads the shards that
carry the contact's partition key (its MD5 hash key lies in their range: the
open shard, and after resharding its parents too) from a little before that
save (AT_TIMESTAMP) to the tip, and keeps this contact's events. The dead
owner publishes nothing more (its heartbeat is a lease old), so the tip is the
end. Cost: one GetShardIterator per shard and a GetRecords per 10,000 records
(or 10 MB) in the window, on every shard that carries the key.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import classify, describe
from callstream.contract import Contract, default_contract
from callstream.errors import ConfigurationFault, PoisonRecordError, RetryableError
from callstream.events import Event

log = logging.getLogger(__name__)

MAX_PAGES = 10_000  # a safety stop: the window is seconds of one stream


def hash_key(partition_key: str) -> int:
    """The 128-bit hash key Kinesis routes a partition key by."""
    return int(hashlib.md5(partition_key.encode()).hexdigest(), 16)


class PublishedEvents:
    """Reads one contact's events back from the audio stream."""

    def __init__(self, kinesis: Any, stream: str, contract: Contract | None = None) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.contract = contract or default_contract()

    def since(self, contact_id: str, since_ms: int) -> list[Event]:
        """This contact's events stored at or after `since_ms`, shard by shard (parents first)."""
        try:
            shards = self._shards_of(hash_key(contact_id))
            events: list[Event] = []
            for shard_id in shards:
                events += self._read(shard_id, contact_id, since_ms)
        except (ClientError, BotoCoreError) as e:
            what = f"reading back {self.stream} for {contact_id}"
            error = classify(e, what=what)
            if isinstance(error, ConfigurationFault):
                raise error from e  # the stream is missing or denied: the service stops
            # Anything else is no fault of a record: the run is tried again later.
            raise RetryableError(f"cannot finish {what}: {describe(e)}") from e
        return events

    def _shards_of(self, key: int) -> list[str]:
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards += page["Shards"]
            if not page.get("NextToken"):
                break
            kwargs = {"NextToken": page["NextToken"]}
        mine = [
            s
            for s in shards
            if int(s["HashKeyRange"]["StartingHashKey"])
            <= key
            <= int(s["HashKeyRange"]["EndingHashKey"])
        ]
        return [s["ShardId"] for s in sorted(mine, key=_start_sequence)]

    def _read(self, shard_id: str, contact_id: str, since_ms: int) -> list[Event]:
        iterator: str | None = self.kinesis.get_shard_iterator(
            StreamName=self.stream,
            ShardId=shard_id,
            ShardIteratorType="AT_TIMESTAMP",
            Timestamp=datetime.fromtimestamp(since_ms / 1000, UTC),
        )["ShardIterator"]
        out: list[Event] = []
        for _ in range(MAX_PAGES):
            if iterator is None:
                break
            page = self.kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            for record in page["Records"]:
                if record["PartitionKey"] != contact_id:
                    continue
                try:
                    out.append(self.contract.decode(record["Data"]))
                except PoisonRecordError as e:
                    log.warning("undecodable record of %s skipped: %s", contact_id, e.reason)
            iterator = page.get("NextShardIterator")
            if page.get("MillisBehindLatest", 0) == 0:
                break  # at the tip: the dead owner publishes nothing more
        return out


def _start_sequence(shard: dict[str, Any]) -> int:
    return int(shard.get("SequenceNumberRange", {}).get("StartingSequenceNumber", "0"))
