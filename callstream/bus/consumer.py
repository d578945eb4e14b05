"""Kinesis Data Streams consumer: leased shards, polled with GetRecords.

Each instance of a service holds leases on some shards (see `leases.py`),
reads them from their checkpoint, and gives them up on close. A child shard
(after a split or merge) is read only once its parents are finished, so a
call's records stay in order across resharding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.bus.leases import Lease, LeaseTable, fair_share, now_ms
from callstream.bus.ports import Record

log = logging.getLogger(__name__)


class KinesisSource:
    """The shards of one stream this instance holds, as a polled record source."""

    def __init__(
        self,
        kinesis: Any,
        leases: LeaseTable,
        *,
        stream: str,
        group: str,
        worker_id: str,
        lease_ms: int = 10_000,
        max_records: int = 1000,
        on_shard_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.kinesis = kinesis
        self.leases = leases
        self.stream = stream
        self.prefix = f"{group}/{stream}/"
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.max_records = max_records
        self.on_shard_lost = on_shard_lost or (lambda shard_id: None)
        self._held: dict[str, Lease] = {}
        self._iterators: dict[str, str | None] = {}
        self._parents: dict[str, list[str]] = {}
        self._next_balance = 0.0

    # --- RecordSource -------------------------------------------------------
    def poll(self) -> list[Record]:
        """Rebalance leases when due, then one GetRecords per held shard."""
        if time.monotonic() >= self._next_balance:
            self._balance()
            self._next_balance = time.monotonic() + self.lease_ms / 3000
        records: list[Record] = []
        for shard_id in list(self._held):
            records.extend(self._read(shard_id))
        return records

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        """Store where this shard resumes; a lost lease makes us drop the shard."""
        lease = self._held.get(shard_id)
        if lease is None:
            return
        if lease.checkpoint == sequence_number and lease.checkpoint_inclusive == inclusive:
            return
        if not self.leases.set_checkpoint(lease, sequence_number, inclusive):
            self._lose(shard_id)

    def close(self) -> None:
        """Release every held lease so another instance takes over at once."""
        for shard_id, lease in list(self._held.items()):
            self.leases.release(lease)
            del self._held[shard_id]

    @property
    def held_shards(self) -> list[str]:
        """Shard ids this instance currently reads."""
        return sorted(self._held)

    # --- leases -------------------------------------------------------------
    def _balance(self) -> None:
        shards = self._list_shards()
        for shard_id in shards:
            self.leases.create(self.prefix + shard_id, shard_id)
        all_leases = {lease.shard_id: lease for lease in self.leases.scan(self.prefix)}
        self._renew(all_leases)
        self._take_free(all_leases, shards)

    def _renew(self, all_leases: dict[str, Lease]) -> None:
        for shard_id in list(self._held):
            seen = all_leases.get(shard_id)
            if seen is None or seen.owner != self.worker_id or seen.finished:
                self._lose(shard_id, release=False)
                continue
            if not self.leases.take(seen, self.worker_id, self.lease_ms):
                self._lose(shard_id, release=False)
                continue
            self._held[shard_id] = seen

    def _take_free(self, all_leases: dict[str, Lease], shards: list[str]) -> None:
        now = now_ms()
        live = {
            lease.owner
            for lease in all_leases.values()
            if lease.owner and lease.expires_at_ms > now
        }
        live.add(self.worker_id)
        readable = [s for s in shards if self._readable(s, all_leases)]
        target = fair_share(len(readable), len(live))
        for shard_id in readable:
            if len(self._held) >= target:
                return
            lease = all_leases[shard_id]
            if shard_id in self._held or (lease.owner and lease.expires_at_ms > now):
                continue
            if self.leases.take(lease, self.worker_id, self.lease_ms):
                log.info("took lease", extra={"shard_id": shard_id, "stream": self.stream})
                self._held[shard_id] = lease
                self._iterators.pop(shard_id, None)

    def _readable(self, shard_id: str, all_leases: dict[str, Lease]) -> bool:
        lease = all_leases.get(shard_id)
        if lease is None or lease.finished:
            return False
        parents = self._parents.get(shard_id, [])
        return all(p not in all_leases or all_leases[p].finished for p in parents)

    def _lose(self, shard_id: str, release: bool = True) -> None:
        lease = self._held.pop(shard_id, None)
        self._iterators.pop(shard_id, None)
        if lease is not None and release:
            self.leases.release(lease)
        log.warning("lost lease", extra={"shard_id": shard_id, "stream": self.stream})
        self.on_shard_lost(shard_id)

    def _list_shards(self) -> list[str]:
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards.extend(page["Shards"])
            token = page.get("NextToken")
            if not token:
                break
            kwargs = {"NextToken": token}
        for shard in shards:
            parents = [shard.get("ParentShardId"), shard.get("AdjacentParentShardId")]
            self._parents[shard["ShardId"]] = [p for p in parents if p]
        return [shard["ShardId"] for shard in shards]

    # --- reading ------------------------------------------------------------
    def _read(self, shard_id: str) -> list[Record]:
        iterator = self._iterator(shard_id)
        if iterator is None:  # the shard was closed and read to its end
            self._finish(shard_id)
            return []
        try:
            response = self.kinesis.get_records(ShardIterator=iterator, Limit=self.max_records)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code == "ExpiredIteratorException":
                self._iterators.pop(shard_id, None)
            else:
                log.warning("get_records: %s", code, extra={"shard_id": shard_id})
            return []
        except BotoCoreError as e:
            log.warning("get_records: %s", e, extra={"shard_id": shard_id})
            return []
        self._iterators[shard_id] = response.get("NextShardIterator")
        records = [
            Record(self.stream, shard_id, r["SequenceNumber"], r["PartitionKey"], r["Data"])
            for r in response.get("Records", [])
        ]
        return records

    def _iterator(self, shard_id: str) -> str | None:
        if shard_id in self._iterators:
            return self._iterators[shard_id]
        lease = self._held[shard_id]
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": shard_id}
        if lease.checkpoint:
            kwargs["ShardIteratorType"] = (
                "AT_SEQUENCE_NUMBER" if lease.checkpoint_inclusive else "AFTER_SEQUENCE_NUMBER"
            )
            kwargs["StartingSequenceNumber"] = lease.checkpoint
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        iterator: str = self.kinesis.get_shard_iterator(**kwargs)["ShardIterator"]
        self._iterators[shard_id] = iterator
        return iterator

    def _finish(self, shard_id: str) -> None:
        lease = self._held.get(shard_id)
        if lease is None:
            return
        self.leases.set_checkpoint(lease, "SHARD_END", False, finished=True)
        self._held.pop(shard_id, None)
        self._iterators.pop(shard_id, None)
        log.info("shard finished", extra={"shard_id": shard_id, "stream": self.stream})
