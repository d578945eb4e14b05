"""Kinesis Data Streams consumer: leased shards, read by a pluggable shard reader.

Each instance of a service holds leases on some shards (see `leases.py`),
reads them from their checkpoint, and gives them up on close. Balancing runs
on a heartbeat thread every third of a lease period, so a slow batch never
lets a lease lapse: renew what we hold, take free or expired leases up to our
fair share, and when none is free steal one lease from the instance holding
the most, if it holds at least two more than we do (one steal per round, so
instances converge without ping-pong). Shards lost on that thread are
reported to `on_shard_lost` at the start of the next `poll()`, on the
caller's thread, before any record of a new holding is returned.

Reading is a strategy (`ShardReader`); leases, checkpoints, the fence and
resharding are the same for every one:
- `PollingReader` (`polling.py`): GetShardIterator/GetRecords, each shard read at
  most once per interval. A shard's 5 GetRecords per second are shared by
  every consumer group reading it, so the interval is sized for the groups
  (`read_interval_s`: at least groups / 5 s, never under 0.2 s), and a
  throttled shard backs off (exponential with jitter, reset on success).
- `FanOutReader` (`fanout.py`): enhanced fan-out, one SubscribeToShard
  subscription per held shard pushing records into a bounded buffer.
A reader returns `Batch`es tagged with the holding they were read for; the
source keeps a batch only if that holding is still in force and unfenced.

Resharding: a closed shard read to its end is *drained*; it is *finished*
(checkpoint `SHARD_END`) only once the loop checkpoints past its last record,
that is once every call on it is settled. A child shard is read once each
parent is finished, or drained and held by this instance: the owner of a
drained parent takes its children first, so a call that continues from the
parent into a child is completed by one instance.

Checkpoints only ever move to records read while holding the current lease,
so a checkpoint computed before a lease was lost and retaken cannot skip
records the new holding has not read yet. With `checkpoint_interval_s` a
shard's checkpoint is written at most that often (the loop asks after every
batch; a later position replaces a pending one, and `close()` writes what is
pending before releasing): fewer lease-table writes, a replay after a crash
at most that much longer. Finishing a drained shard is never deferred.

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
never over a Kinesis request: `poll()` notes under the lock what to read
(and tells the reader, which must not block there), reads without it, and
keeps the records only if the same holding is still in force and unfenced
when it has the lock again.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.bus.leases import Lease, LeaseTable, fair_share
from callstream.bus.polling import PollingReader
from callstream.bus.ports import Record
from callstream.bus.reader import SHARD_END, Batch, Position, ShardRead, ShardReader
from callstream.clock import now_ms
from callstream.metrics import ITERATOR_AGE_MS, LEASES_FENCED, Metrics

log = logging.getLogger(__name__)
FENCE_MARGIN = 0.1  # of the lease: a renewal counts for 90% of it, for skew between hosts


class KinesisSource:
    """The shards of one stream this instance holds, as a record source."""

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
        reader: ShardReader | None = None,
        checkpoint_interval_s: float = 0.0,
    ) -> None:
        self.kinesis = kinesis
        self.metrics = metrics
        self.leases = leases
        self.stream = stream
        self.prefix = f"{group}/{stream}/"
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.reader: ShardReader = reader or PollingReader(
            kinesis, stream, max_records=max_records, metrics=metrics
        )
        self.on_shard_lost = on_shard_lost or (lambda shard_id: None)
        self.clock = clock
        self._fence_s = lease_ms * (1 - FENCE_MARGIN) / 1000
        self._held: dict[str, Lease] = {}
        self._holding: dict[str, int] = {}  # shard -> which holding of it this is
        self._holdings = itertools.count(1)
        self._renewed_at: dict[str, float] = {}  # shard -> clock() before the last take/renewal
        self._ended: set[str] = set()  # held shards read to their end in this holding
        self.checkpoint_interval_s = checkpoint_interval_s
        self._written_at: dict[str, float] = {}  # shard -> clock() of its last checkpoint write
        self._pending: dict[str, tuple[str, bool]] = {}  # shard -> checkpoint not written yet
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
        """What the reader has for the held shards (the first poll takes leases and starts the
        heartbeat)."""
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
            self.reader.follow(reads)
        batches = self.reader.read(reads)  # without the lock: the heartbeat renews meanwhile
        records: list[Record] = []
        with self._lock:
            for batch in batches:
                records.extend(self._accept(batch))
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
            self._pending.pop(shard_id, None)
            return
        now = self.clock()
        if now - self._written_at.get(shard_id, -self.checkpoint_interval_s) < (
            self.checkpoint_interval_s
        ):
            self._pending[shard_id] = (sequence_number, inclusive)  # the loop asks again soon
            return
        self._write_checkpoint(shard_id, lease, sequence_number, inclusive)
        self._written_at[shard_id] = now

    def _write_checkpoint(
        self, shard_id: str, lease: Lease, sequence_number: str, inclusive: bool
    ) -> None:
        self._pending.pop(shard_id, None)
        if not self.leases.set_checkpoint(lease, sequence_number, inclusive):
            self._lose(shard_id, release=False)

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        """Read `shard_id` again from this record (inclusive) from the next poll on, for a
        consumer that paused there. A shard lost since the last poll is left alone (its
        loss is reported first and its next holding starts at the checkpoint)."""
        with self._lock:
            if shard_id not in self._held or shard_id in self._lost:
                return
            start = Position("AT_SEQUENCE_NUMBER", sequence_number)
            self.reader.rewind(ShardRead(shard_id, self._holding[shard_id], start))
            self._ended.discard(shard_id)

    def close(self) -> None:
        """Stop the heartbeat and release every held lease so another instance takes over."""
        self._stopping.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with self._lock:
            for shard_id, (sequence_number, inclusive) in list(self._pending.items()):
                lease = self._held.get(shard_id)
                if lease is not None and not self._overdue(shard_id):
                    write = functools.partial(
                        self._write_checkpoint, shard_id, lease, sequence_number, inclusive
                    )
                    self._safely("checkpoint", write)
            for shard_id, lease in list(self._held.items()):
                self._safely("release", functools.partial(self.leases.release, lease))
                self._forget(shard_id)
        self.reader.close()

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
        self._ended.discard(shard_id)
        self._last_read.pop(shard_id, None)
        self._written_at.pop(shard_id, None)
        self._pending.pop(shard_id, None)
        self.reader.release(shard_id)
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
    def _plan_reads(self) -> list[ShardRead]:
        """What to read this poll; finish drained shards the checkpoint already covers."""
        reads: list[ShardRead] = []
        for shard_id in list(self._held):
            if shard_id in self._lost:
                continue  # lost and retaken since the report: its loss goes first
            if self._at_end(shard_id):
                if shard_id not in self._last_read:  # the checkpoint already covers it all
                    self._finish(shard_id)
                continue
            start = Position.of_lease(self._held[shard_id])
            reads.append(ShardRead(shard_id, self._holding[shard_id], start))
        return reads

    def _accept(self, batch: Batch) -> list[Record]:
        """The records read, if the holding they were read in is still ours and unfenced."""
        shard_id = batch.shard_id
        if self._holding.get(shard_id) != batch.holding:
            return []  # lost (perhaps retaken) while reading: reported at the next poll
        if self._overdue(shard_id):
            self._fence(shard_id)
            return []
        if self.metrics is not None and batch.millis_behind is not None:
            self.metrics.gauge(ITERATOR_AGE_MS, batch.millis_behind, shard=shard_id)
        if batch.records:
            self._last_read[shard_id] = batch.records[-1].sequence_number
        if batch.at_end:
            self._ended.add(shard_id)
            self._drained(shard_id)
        return batch.records

    def _at_end(self, shard_id: str) -> bool:
        """Read to the end of a closed shard in this holding."""
        return shard_id in self._ended

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
