"""Kinesis Data Streams consumer: leased shards, polled with GetRecords.

Each instance of a service holds leases on some shards (see `leases.py`),
reads them from their checkpoint, and gives them up on close. Balancing runs
on a heartbeat thread every third of a lease period, so a slow batch never
lets a lease lapse: renew what we hold, take free or expired leases up to our
fair share, and when none is free steal one lease from the instance holding
the most, if it holds at least two more than we do (one steal per round, so
instances converge without ping-pong). Shards lost on that thread are
reported to `on_shard_lost` at the start of the next `poll()`, on the
caller's thread, before any record of a new holding is returned.

Resharding: a closed shard read to its end is *drained*; it is *finished*
(checkpoint `SHARD_END`) only once the loop checkpoints past its last record,
that is once every call on it is settled. A child shard is read once each
parent is finished, or drained and held by this instance: the owner of a
drained parent takes its children first, so a call that continues from the
parent into a child is completed by one instance.

Checkpoints only ever move to records read while holding the current lease,
so a checkpoint computed before a lease was lost and retaken cannot skip
records the new holding has not read yet.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.bus.leases import Lease, LeaseTable, fair_share, now_ms
from callstream.bus.ports import Record
from callstream.errors import StoreUnavailable
from callstream.metrics import ITERATOR_AGE_MS, Metrics

log = logging.getLogger(__name__)
SHARD_END = "SHARD_END"


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
        metrics: Metrics | None = None,
    ) -> None:
        self.kinesis = kinesis
        self.metrics = metrics
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
        self._last_read: dict[str, str] = {}  # shard -> last sequence read in this holding
        self._lost: list[str] = []  # shards lost since the last poll, to report
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._extra = {"stream": stream}

    # --- RecordSource -------------------------------------------------------
    def poll(self) -> list[Record]:
        """One GetRecords per held shard (the first poll takes leases and starts the heartbeat)."""
        with self._lock:
            if self._heartbeat is None:
                self._safely(self.balance)
                self._heartbeat = threading.Thread(
                    target=self._beat, name=f"leases-{self.stream}", daemon=True
                )
                self._heartbeat.start()
            # Losses first: the caller drops what it built from the old holding before it
            # sees records of a new one (a shard may be lost and retaken between polls).
            lost, self._lost = self._lost, []
            for shard_id in lost:
                self.on_shard_lost(shard_id)
            records: list[Record] = []
            for shard_id in list(self._held):
                if self._at_end(shard_id):
                    if shard_id not in self._last_read:  # the checkpoint already covers it all
                        self._finish(shard_id)
                    continue
                records.extend(self._read(shard_id))
        return records

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        """Store where this shard resumes; a lost lease makes us drop the shard."""
        with self._lock:
            self._safely(lambda: self._checkpoint(shard_id, sequence_number, inclusive))

    def _checkpoint(self, shard_id: str, sequence_number: str, inclusive: bool) -> None:
        lease = self._held.get(shard_id)
        last = self._last_read.get(shard_id)
        if lease is None or last is None or int(sequence_number) > int(last):
            return  # nothing read in this holding, or a stale position from an earlier one
        if self._at_end(shard_id) and not inclusive and sequence_number == last:
            self._finish(shard_id)
            return
        if lease.checkpoint == sequence_number and lease.checkpoint_inclusive == inclusive:
            return
        if not self.leases.set_checkpoint(lease, sequence_number, inclusive):
            self._lose(shard_id, release=False)

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        """Read `shard_id` again from this record (inclusive) from the next poll on, for a
        consumer that paused there. A shard lost since the last poll is left alone (its
        loss is reported first and its next holding starts at the checkpoint)."""
        with self._lock:
            if shard_id not in self._held or shard_id in self._lost:
                return
        try:  # without the lock, like every Kinesis request
            iterator = self.kinesis.get_shard_iterator(
                StreamName=self.stream,
                ShardId=shard_id,
                ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=sequence_number,
            )["ShardIterator"]
        except (ClientError, BotoCoreError) as e:
            raise StoreUnavailable(
                f"cannot re-read {self.stream} {shard_id} from {sequence_number}: {e}"
            ) from e
        with self._lock:  # polls run on this thread: a loss meanwhile is still in _lost
            if shard_id in self._held and shard_id not in self._lost:
                self._iterators[shard_id] = iterator

    def close(self) -> None:
        """Stop the heartbeat and release every held lease so another instance takes over."""
        self._stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._lock:
            for shard_id, lease in list(self._held.items()):
                self._safely(functools.partial(self.leases.release, lease))
                del self._held[shard_id]

    def _beat(self) -> None:
        while not self._stopping.wait(self.lease_ms / 3000):
            with self._lock:
                self._safely(self.balance)

    def _safely(self, action: Callable[[], object]) -> None:
        """Run a lease-table action; a throttled or failed request waits for the next round."""
        try:
            action()
        except (ClientError, BotoCoreError) as e:
            log.warning("lease table: %s", e, extra=self._extra)

    @property
    def held_shards(self) -> list[str]:
        """Shard ids this instance currently reads."""
        return sorted(self._held)

    # --- leases -------------------------------------------------------------
    def balance(self) -> None:
        """List shards, renew our leases, take our fair share (stealing one if needed)."""
        shards = self._list_shards()
        for shard_id in shards:
            self.leases.create(self.prefix + shard_id, shard_id)
        all_leases = {lease.shard_id: lease for lease in self.leases.scan(self.prefix)}
        self._renew(all_leases)
        self._take_children(all_leases, shards)
        if not self._take_free(all_leases, shards):
            self._steal(all_leases, shards)

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

    def _take_children(self, all_leases: dict[str, Lease], shards: list[str]) -> None:
        """Children of drained parents we hold come first, beyond the fair share."""
        now = now_ms()
        for shard_id in shards:
            parents = self._parents.get(shard_id, [])
            lease = all_leases.get(shard_id)
            if not parents or lease is None or shard_id in self._held:
                continue
            if not any(p in self._held for p in parents):
                continue
            if self._readable(shard_id, all_leases) and not _alive(lease, now):
                self._claim(lease)

    def _take_free(self, all_leases: dict[str, Lease], shards: list[str]) -> bool:
        """Take free or expired leases up to our share; False if we are still short."""
        now = now_ms()
        readable = [s for s in shards if self._readable(s, all_leases)]
        target = fair_share(len(readable), len(_live_owners(all_leases, self.worker_id, now)))
        for shard_id in readable:
            if len(self._held) >= target:
                return True
            lease = all_leases[shard_id]
            if shard_id not in self._held and not _alive(lease, now):
                self._claim(lease)
        return len(self._held) >= target or not readable

    def _steal(self, all_leases: dict[str, Lease], shards: list[str]) -> None:
        """Take one lease from the busiest live owner if it holds two more than we do."""
        now = now_ms()
        readable = [all_leases[s] for s in shards if self._readable(s, all_leases)]
        counts = Counter(lease.owner for lease in readable if lease.owner and _alive(lease, now))
        counts.pop(self.worker_id, None)
        if not counts:
            return
        victim, most = counts.most_common(1)[0]
        if most - len(self._held) < 2:
            return
        candidates = [lease for lease in readable if lease.owner == victim and not lease.drained]
        if not candidates:
            return
        lease = min(candidates, key=lambda candidate: candidate.shard_id)
        if self._claim(lease):
            log.info(
                "stole lease from %s", victim, extra={**self._extra, "shard_id": lease.shard_id}
            )

    def _claim(self, lease: Lease) -> bool:
        if not self.leases.take(lease, self.worker_id, self.lease_ms):
            return False
        log.info("took lease", extra={**self._extra, "shard_id": lease.shard_id})
        self._held[lease.shard_id] = lease
        self._iterators.pop(lease.shard_id, None)
        self._last_read.pop(lease.shard_id, None)
        return True

    def _readable(self, shard_id: str, all_leases: dict[str, Lease]) -> bool:
        lease = all_leases.get(shard_id)
        if lease is None or lease.finished:
            return False
        for parent_id in self._parents.get(shard_id, []):
            parent = all_leases.get(parent_id)
            if parent is None or parent.finished:
                continue
            if not (parent.drained and parent_id in self._held):
                return False
        return True

    def _lose(self, shard_id: str, release: bool = True) -> None:
        lease = self._held.pop(shard_id, None)
        self._iterators.pop(shard_id, None)
        self._last_read.pop(shard_id, None)
        if lease is not None and release:
            self.leases.release(lease)
        log.warning("lost lease", extra={**self._extra, "shard_id": shard_id})
        self._lost.append(shard_id)

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
        try:
            iterator = self._iterator(shard_id)
            response = self.kinesis.get_records(ShardIterator=iterator, Limit=self.max_records)
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code == "ExpiredIteratorException":
                self._iterators.pop(shard_id, None)
            else:
                log.warning("get_records: %s", code, extra={**self._extra, "shard_id": shard_id})
            return []
        except BotoCoreError as e:
            log.warning("get_records: %s", e, extra={**self._extra, "shard_id": shard_id})
            return []
        self._iterators[shard_id] = response.get("NextShardIterator")
        if self.metrics is not None:
            behind = float(response.get("MillisBehindLatest", 0))
            self.metrics.gauge(ITERATOR_AGE_MS, behind, shard=shard_id)
        records = [
            Record(self.stream, shard_id, r["SequenceNumber"], r["PartitionKey"], r["Data"])
            for r in response.get("Records", [])
        ]
        if records:
            self._last_read[shard_id] = records[-1].sequence_number
        if self._at_end(shard_id):
            self._drained(shard_id)
        return records

    def _iterator(self, shard_id: str) -> str:
        iterator = self._iterators.get(shard_id)
        if iterator is not None:
            return iterator
        lease = self._held[shard_id]
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": shard_id}
        if lease.checkpoint and lease.checkpoint != SHARD_END:
            kwargs["ShardIteratorType"] = (
                "AT_SEQUENCE_NUMBER" if lease.checkpoint_inclusive else "AFTER_SEQUENCE_NUMBER"
            )
            kwargs["StartingSequenceNumber"] = lease.checkpoint
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        fresh: str = self.kinesis.get_shard_iterator(**kwargs)["ShardIterator"]
        self._iterators[shard_id] = fresh
        return fresh

    def _at_end(self, shard_id: str) -> bool:
        """Read to the end of a closed shard (GetRecords gave no next iterator)."""
        return shard_id in self._iterators and self._iterators[shard_id] is None

    def _drained(self, shard_id: str) -> None:
        lease = self._held.get(shard_id)
        if lease is not None and not lease.drained and not self.leases.mark_drained(lease):
            self._lose(shard_id, release=False)
            return
        log.info("shard drained", extra={**self._extra, "shard_id": shard_id})

    def _finish(self, shard_id: str) -> None:
        lease = self._held.get(shard_id)
        if lease is None:
            return
        if not self.leases.set_checkpoint(lease, SHARD_END, False, finished=True):
            self._lose(shard_id, release=False)
            return
        self._held.pop(shard_id, None)
        self._iterators.pop(shard_id, None)
        self._last_read.pop(shard_id, None)
        log.info("shard finished", extra={**self._extra, "shard_id": shard_id})
        self._lost.append(shard_id)  # nothing of it is open: the loop just forgets it


def _alive(lease: Lease, now: int) -> bool:
    return lease.owner is not None and lease.expires_at_ms > now


def _live_owners(all_leases: dict[str, Lease], me: str, now: int) -> set[str]:
    live = {lease.owner for lease in all_leases.values() if lease.owner and _alive(lease, now)}
    live.add(me)
    return live
