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

Fence: a lease proves nothing once it may have expired. For each held shard
the source keeps, on its own monotonic clock, when the request that last took
or renewed the lease was *sent*; once `lease_ms` less a tenth (for clock skew
between hosts) has passed since then, the shard is fenced: treated as lost
(`on_shard_lost`, metric `leases_fenced`), none of its records is returned and
no checkpoint is written for it, even if the lease table cannot be reached
and even if the records were returned before the fence fell. That covers a
frozen process, a starved heartbeat and an unreachable lease table; the
table's conditional writes remain the proof against a second owner.

Locking: `_lock` guards the holding; the heartbeat takes it. It is held over
lease-table requests (their own client: short timeouts, two attempts) but
never over a Kinesis request: `poll()` notes under the lock what to read,
reads without it, and keeps the records only if the same holding is still in
force and unfenced when it has the lock again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.bus.leases import Lease, LeaseTable, fair_share, now_ms
from callstream.bus.ports import Record
from callstream.errors import StoreUnavailable
from callstream.metrics import ITERATOR_AGE_MS, LEASES_FENCED, Metrics

log = logging.getLogger(__name__)
SHARD_END = "SHARD_END"
FENCE_MARGIN = 0.1  # of the lease: a renewal counts for 90% of it, for skew between hosts


@dataclass(frozen=True)
class _Read:
    """One GetRecords a poll makes: a shard in one holding, from an iterator or a position."""

    shard_id: str
    holding: int
    iterator: str | None
    start: dict[str, Any]  # GetShardIterator's arguments, for when there is no iterator


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
        clock: Callable[[], float] = time.monotonic,
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
        self.clock = clock
        self._fence_s = lease_ms * (1 - FENCE_MARGIN) / 1000
        self._held: dict[str, Lease] = {}
        self._holding: dict[str, int] = {}  # shard -> which holding of it this is
        self._holdings = itertools.count(1)
        self._renewed_at: dict[str, float] = {}  # shard -> clock() before the last take/renewal
        self._iterators: dict[str, str | None] = {}
        self._parents: dict[str, list[str]] = {}
        self._last_read: dict[str, str] = {}  # shard -> last sequence read in this holding
        self._lost: list[str] = []  # shards lost since the last poll, to report
        self._failed_rounds = 0
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._extra = {"stream": stream}

    # --- RecordSource -------------------------------------------------------
    def poll(self) -> list[Record]:
        """One GetRecords per held shard (the first poll takes leases and starts the heartbeat)."""
        if self._heartbeat is None:
            self.heartbeat()
            self._heartbeat = threading.Thread(
                target=self._beat, name=f"leases-{self.stream}", daemon=True
            )
            self._heartbeat.start()
        with self._lock:
            self._fence_overdue()
            lost, self._lost = self._lost, []
        # Losses first: the caller drops what it built from the old holding before it
        # sees records of a new one (a shard may be lost and retaken between polls).
        for shard_id in lost:
            self.on_shard_lost(shard_id)
        with self._lock:
            reads = self._plan_reads()
        records: list[Record] = []
        for read in reads:
            response = self._fetch(read)  # without the lock: the heartbeat renews meanwhile
            if response is not None:
                with self._lock:
                    records.extend(self._accept(read, response))
        return records

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        """Store where this shard resumes; a lost or fenced lease makes us drop the shard."""
        with self._lock:
            if shard_id in self._held and self._overdue(shard_id):
                self._fence(shard_id)
                return
            self._safely(
                "checkpoint", lambda: self._checkpoint(shard_id, sequence_number, inclusive)
            )

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
                self._safely("release", functools.partial(self.leases.release, lease))
                self._forget(shard_id)

    def heartbeat(self) -> None:
        """One balancing round; a failed one is logged, and overdue leases fence themselves."""
        try:
            self.balance()
        except (ClientError, BotoCoreError) as e:
            with self._lock:
                self._failed_rounds += 1
                first = min(self._renewed_at.values(), default=None)
                fenced_in = "-" if first is None else f"{first + self._fence_s - self.clock():.1f}"
                log.warning(
                    "lease heartbeat failed %d rounds in a row (%d held, first fenced in %s s): %s",
                    self._failed_rounds,
                    len(self._held),
                    fenced_in,
                    e,
                    extra=self._extra,
                )
        else:
            self._failed_rounds = 0

    def _beat(self) -> None:
        while not self._stopping.wait(self.lease_ms / 3000):
            self.heartbeat()

    def _safely(self, what: str, action: Callable[[], object]) -> None:
        """Run a lease-table write the loop asked for; a failed one waits for the next call."""
        try:
            action()
        except (ClientError, BotoCoreError) as e:
            log.warning("lease table: %s failed: %s", what, e, extra=self._extra)

    @property
    def held_shards(self) -> list[str]:
        """Shard ids this instance currently reads."""
        return sorted(self._held.copy())

    # --- leases -------------------------------------------------------------
    def balance(self) -> None:
        """Renew our leases, list shards, take our fair share (stealing one if needed)."""
        with self._lock:
            all_leases = self._scan()
            self._renew(all_leases)
        try:
            shards, parents = self._list_shards()  # Kinesis: not under the lock
        except (ClientError, BotoCoreError) as e:
            log.warning("list_shards: %s (leases renewed, none taken)", e, extra=self._extra)
            return
        with self._lock:
            self._parents.update(parents)
            missing = [shard_id for shard_id in shards if shard_id not in all_leases]
            for shard_id in missing:
                self.leases.create(self.prefix + shard_id, shard_id)
            if missing:
                all_leases = self._scan()
            self._take_children(all_leases, shards)
            if not self._take_free(all_leases, shards):
                self._steal(all_leases, shards)

    def _scan(self) -> dict[str, Lease]:
        return {lease.shard_id: lease for lease in self.leases.scan(self.prefix)}

    def _renew(self, all_leases: dict[str, Lease]) -> None:
        for shard_id in list(self._held):
            seen = all_leases.get(shard_id)
            if seen is None or seen.owner != self.worker_id or seen.finished:
                self._lose(shard_id, release=False)
                continue
            sent = self.clock()
            if self._overdue(shard_id, sent):
                self._fence(shard_id)  # too late: what it returned must not be checkpointed
                continue
            if not self.leases.take(seen, self.worker_id, self.lease_ms):
                self._lose(shard_id, release=False)
                continue
            self._held[shard_id] = seen
            self._renewed_at[shard_id] = sent

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
        sent = self.clock()
        if not self.leases.take(lease, self.worker_id, self.lease_ms):
            return False
        log.info("took lease", extra={**self._extra, "shard_id": lease.shard_id})
        self._forget(lease.shard_id)
        self._held[lease.shard_id] = lease
        self._holding[lease.shard_id] = next(self._holdings)
        self._renewed_at[lease.shard_id] = sent
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
        lease = self._forget(shard_id)
        if lease is not None and release:
            self.leases.release(lease)
        log.warning("lost lease", extra={**self._extra, "shard_id": shard_id})
        self._lost.append(shard_id)

    def _forget(self, shard_id: str) -> Lease | None:
        """Drop everything of this holding of the shard; the lease we held, if any."""
        self._holding.pop(shard_id, None)
        self._renewed_at.pop(shard_id, None)
        self._iterators.pop(shard_id, None)
        self._last_read.pop(shard_id, None)
        return self._held.pop(shard_id, None)

    # --- the fence ----------------------------------------------------------
    def _overdue(self, shard_id: str, now: float | None = None) -> bool:
        """True once the last renewal of a held lease is too old to prove we still hold it."""
        now = self.clock() if now is None else now
        return now >= self._renewed_at[shard_id] + self._fence_s

    def _fence_overdue(self) -> None:
        for shard_id in list(self._held):
            if self._overdue(shard_id):
                self._fence(shard_id)

    def _fence(self, shard_id: str) -> None:
        """Stop using a lease another instance may hold by now: lost, nothing read or stored."""
        since = self.clock() - self._renewed_at[shard_id]
        self._forget(shard_id)
        log.warning(
            "lease fenced: not renewed for %.1f s (lease %.1f s)",
            since,
            self.lease_ms / 1000,
            extra={**self._extra, "shard_id": shard_id},
        )
        if self.metrics is not None:
            self.metrics.count(LEASES_FENCED, shard=shard_id)
        self._lost.append(shard_id)

    def _list_shards(self) -> tuple[list[str], dict[str, list[str]]]:
        """Every shard of the stream, and each one's parents."""
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards.extend(page["Shards"])
            token = page.get("NextToken")
            if not token:
                break
            kwargs = {"NextToken": token}
        parents = {
            shard["ShardId"]: [
                p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
            ]
            for shard in shards
        }
        return [shard["ShardId"] for shard in shards], parents

    # --- reading ------------------------------------------------------------
    def _plan_reads(self) -> list[_Read]:
        """What to read this poll; finish drained shards the checkpoint already covers."""
        reads: list[_Read] = []
        for shard_id in list(self._held):
            if shard_id in self._lost:
                continue  # lost and retaken since the report: its loss goes first
            if self._at_end(shard_id):
                if shard_id not in self._last_read:  # the checkpoint already covers it all
                    self._finish(shard_id)
                continue
            holding = self._holding[shard_id]
            start = self._start(self._held[shard_id])
            reads.append(_Read(shard_id, holding, self._iterators.get(shard_id), start))
        return reads

    def _start(self, lease: Lease) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": lease.shard_id}
        if lease.checkpoint and lease.checkpoint != SHARD_END:
            kwargs["ShardIteratorType"] = (
                "AT_SEQUENCE_NUMBER" if lease.checkpoint_inclusive else "AFTER_SEQUENCE_NUMBER"
            )
            kwargs["StartingSequenceNumber"] = lease.checkpoint
        else:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        return kwargs

    def _fetch(self, read: _Read) -> dict[str, Any] | None:
        """GetShardIterator if needed, then GetRecords; None if either failed."""
        extra = {**self._extra, "shard_id": read.shard_id}
        try:
            iterator = read.iterator
            if iterator is None:
                iterator = self.kinesis.get_shard_iterator(**read.start)["ShardIterator"]
            response: dict[str, Any] = self.kinesis.get_records(
                ShardIterator=iterator, Limit=self.max_records
            )
        except ClientError as e:
            code = e.response["Error"]["Code"]
            if code != "ExpiredIteratorException":
                log.warning("get_records: %s", code, extra=extra)
                return None
            with self._lock:
                if self._holding.get(read.shard_id) == read.holding:
                    self._iterators.pop(read.shard_id, None)
            return None
        except BotoCoreError as e:
            log.warning("get_records: %s", e, extra=extra)
            return None
        return response

    def _accept(self, read: _Read, response: dict[str, Any]) -> list[Record]:
        """The records read, if the holding they were read in is still ours and unfenced."""
        shard_id = read.shard_id
        if self._holding.get(shard_id) != read.holding:
            return []  # lost (perhaps retaken) while reading: reported at the next poll
        if self._overdue(shard_id):
            self._fence(shard_id)
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
        if self._overdue(shard_id):
            self._fence(shard_id)
            return
        if not self.leases.set_checkpoint(lease, SHARD_END, False, finished=True):
            self._lose(shard_id, release=False)
            return
        self._forget(shard_id)
        log.info("shard finished", extra={**self._extra, "shard_id": shard_id})
        self._lost.append(shard_id)  # nothing of it is open: the loop just forgets it


def _alive(lease: Lease, now: int) -> bool:
    return lease.owner is not None and lease.expires_at_ms > now


def _live_owners(all_leases: dict[str, Lease], me: str, now: int) -> set[str]:
    live = {lease.owner for lease in all_leases.values() if lease.owner and _alive(lease, now)}
    live.add(me)
    return live
