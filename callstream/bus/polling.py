"""Reading held shards by polling: GetShardIterator and GetRecords, paced for the shard.

A shard's 5 GetRecords per second are shared by every consumer group reading
it, so each group reads a shard at most once per `read_interval_s(groups)`
(at least groups / 5 s, never under 0.2 s), and a throttled shard backs off
(exponential with jitter, reset on success). The `ShardReader` that
`KinesisSource` uses unless it is given another (`fanout.py`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import error_code
from callstream.bus.ports import Record
from callstream.bus.reader import Batch, Position, ShardRead
from callstream.metrics import Metrics

log = logging.getLogger(__name__)
READS_PER_SHARD_S = 5  # AWS: GetRecords per second per shard, shared by every consumer
MIN_READ_INTERVAL_S = 1 / READS_PER_SHARD_S
THROTTLE_BACKOFF_CAP_S = 5.0
READ_THROTTLES = "read_throttles"  # counter, label shard: reads refused for throughput
THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "KMSThrottlingException",
        "ThrottlingException",
    }
)


def read_interval_s(groups: int, floor_s: float = MIN_READ_INTERVAL_S) -> float:
    """Seconds between two GetRecords on one shard by one group, so that `groups` groups
    polling it together stay within the shard's 5 reads per second (and never under 0.2 s)."""
    return max(floor_s, MIN_READ_INTERVAL_S, max(1, groups) / READS_PER_SHARD_S)


@dataclass
class _Polled:
    """A polled shard: its holding, where a new iterator would start, when it may be read."""

    holding: int
    position: Position
    iterator: str | None = None
    due: float = 0.0
    throttles: int = 0


class PollingReader:
    """Reads held shards with GetShardIterator and GetRecords, each at most once per interval.

    The interval is the group's share of the shard's 5 GetRecords per second
    (`read_interval_s`); a throttled shard waits `interval * 2**n` seconds
    times a jitter in [1, 2) after its n-th throttle in a row (capped at 5 s),
    and the count resets on success. `read()` sleeps until the first shard is
    due, at most `max_wait_s`. An expired iterator resumes after the last
    record this holding read (never from the checkpoint, which would repeat
    what the loop has). Only the consumer loop's thread calls it.
    """

    def __init__(
        self,
        kinesis: Any,
        stream: str,
        *,
        max_records: int = 1000,
        interval_s: float = MIN_READ_INTERVAL_S,
        max_wait_s: float = 0.5,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.max_records = max_records
        self.interval_s = max(MIN_READ_INTERVAL_S, interval_s)
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self._shards: dict[str, _Polled] = {}

    def follow(self, reads: list[ShardRead]) -> None:
        """Keep the state of these holdings, start new ones at their position."""
        fresh: dict[str, _Polled] = {}
        for read in reads:
            state = self._shards.get(read.shard_id)
            if state is None or state.holding != read.holding:
                due = 0.0 if state is None else state.due  # the shard's pace outlives a holding
                state = _Polled(read.holding, read.start, due=due)
            fresh[read.shard_id] = state
        self._shards = fresh

    def rewind(self, read: ShardRead) -> None:
        """A new iterator at `read.start` at the next read of the shard."""
        state = self._shards.get(read.shard_id)
        due = 0.0 if state is None else state.due
        self._shards[read.shard_id] = _Polled(read.holding, read.start, due=due)

    def release(self, shard_id: str) -> None:
        """Nothing to stop: `follow` drops the shard at the next poll."""

    def close(self) -> None:
        """Nothing to stop."""
        self._shards.clear()

    def read(self, reads: list[ShardRead]) -> list[Batch]:
        """One GetRecords per due shard, after sleeping until the first is due (bounded)."""
        wanted = [(read, self._shards[read.shard_id]) for read in reads]
        if not wanted:
            return []
        first = min(state.due for _, state in wanted)
        wait = first - self.clock()
        if wait > self.max_wait_s:
            self.sleep(self.max_wait_s)
            return []
        if wait > 0:
            self.sleep(wait)
        now = self.clock()
        batches: list[Batch] = []
        for read, state in wanted:
            if state.due <= now:
                batch = self._read_one(read, state)
                if batch is not None:
                    batches.append(batch)
        return batches

    def _read_one(self, read: ShardRead, state: _Polled) -> Batch | None:
        started = self.clock()
        state.due = started + self.interval_s
        extra = {"stream": self.stream, "shard_id": read.shard_id}
        try:
            if state.iterator is None:
                state.iterator = self.kinesis.get_shard_iterator(
                    StreamName=self.stream, ShardId=read.shard_id, **state.position.iterator_args()
                )["ShardIterator"]
            response = self.kinesis.get_records(
                ShardIterator=state.iterator, Limit=self.max_records
            )
        except ClientError as e:
            self._failed(read, state, started, error_code(e), extra)
            return None
        except BotoCoreError as e:
            log.warning("get_records: %s", e, extra=extra)
            return None
        state.throttles = 0
        state.iterator = response.get("NextShardIterator")
        records = [
            Record(self.stream, read.shard_id, r["SequenceNumber"], r["PartitionKey"], r["Data"])
            for r in response.get("Records", [])
        ]
        if records:
            state.position = Position("AFTER_SEQUENCE_NUMBER", records[-1].sequence_number)
        behind = response.get("MillisBehindLatest")
        return Batch(
            read.shard_id,
            read.holding,
            records,
            at_end=state.iterator is None,
            millis_behind=None if behind is None else float(behind),
        )

    def _failed(
        self, read: ShardRead, state: _Polled, started: float, code: str, extra: dict[str, str]
    ) -> None:
        if code == "ExpiredIteratorException":
            state.iterator = None  # a new one at the position: after what this holding read
            return
        if code in THROTTLE_CODES:
            state.throttles += 1
            backoff = self.interval_s * 2 ** (state.throttles - 1) * (1 + random.random())
            state.due = started + min(THROTTLE_BACKOFF_CAP_S, backoff)
            if self.metrics is not None:
                self.metrics.count(READ_THROTTLES, shard=read.shard_id)
            log.info(
                "get_records throttled %d times in a row; next read in %.2f s",
                state.throttles,
                state.due - started,
                extra=extra,
            )
            return
        log.warning("get_records: %s", code, extra=extra)
