"""Follow a stream from its start without leases or checkpoints (CLI, demo, tests).

Reads every shard from TRIM_HORIZON (or LATEST) and yields decoded events;
undecodable records are yielded as the PoisonRecordError that explains them.

A tail is one more reader of the stream's shards, which share 5 GetRecords
per second among every reader: it reads through the services' `PollingReader`,
so each shard is read at most once per `read_interval_s(groups)` and a
throttled shard backs off (exponential with jitter, reset on success; metric
`read_throttles` when given metrics). `groups` defaults to 3, the transcripts
stream's usual readers: a viewer takes a third of a shard's reads, not all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from callstream.bus.polling import THROTTLE_BACKOFF_CAP_S, PollingReader, read_interval_s
from callstream.bus.reader import Position, ShardRead
from callstream.contract import Contract, default_contract
from callstream.errors import PoisonRecordError
from callstream.events import Event
from callstream.metrics import Metrics

TAIL_GROUPS = 3  # readers a tail assumes share each shard (the transcripts stream's usual)
_HOLDING = 1  # a tail holds no lease: one holding per shard, for the reader's bookkeeping


class StreamTail:
    """Reads every shard of one stream, paced within the shard's shared read budget."""

    def __init__(
        self,
        kinesis: Any,
        stream: str,
        *,
        latest: bool = False,
        contract: Contract | None = None,
        groups: int = TAIL_GROUPS,
        patience_s: float = THROTTLE_BACKOFF_CAP_S,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.contract = contract or default_contract()
        self.interval_s = read_interval_s(groups)
        self.patience_s = patience_s
        self.clock = clock
        self.reader = PollingReader(
            kinesis,
            stream,
            interval_s=self.interval_s,
            max_wait_s=self.interval_s,
            metrics=metrics,
            clock=clock,
            sleep=sleep,
        )
        self._start = Position("LATEST" if latest else "TRIM_HORIZON")
        self._shards: list[str] = []
        self._ended: set[str] = set()

    def poll(self) -> list[Event | PoisonRecordError]:
        """Everything that arrived on any shard since the last poll: one GetRecords per open
        shard, each when its pace allows (so a poll takes up to one interval). A throttled or
        failed shard is tried again after its backoff, for at most `patience_s`; one still
        unread is read at the next poll, from where it stopped."""
        self._discover()
        pending = {s: ShardRead(s, _HOLDING, self._start) for s in self._shards}
        for shard_id in self._ended:
            pending.pop(shard_id, None)
        self.reader.follow(list(pending.values()))
        out: list[Event | PoisonRecordError] = []
        deadline = self.clock() + self.interval_s + self.patience_s
        while pending and self.clock() < deadline:
            for batch in self.reader.read(list(pending.values())):
                del pending[batch.shard_id]
                if batch.at_end:
                    self._ended.add(batch.shard_id)
                for record in batch.records:
                    try:
                        out.append(self.contract.decode(record.data))
                    except PoisonRecordError as e:
                        out.append(e)
        return out

    def follow(self) -> Iterator[Event | PoisonRecordError]:
        """Poll forever, yielding as records arrive (the reader paces the polls)."""
        while True:
            yield from self.poll()

    def _discover(self) -> None:
        shards = self.kinesis.list_shards(StreamName=self.stream)["Shards"]
        known = set(self._shards)
        self._shards.extend(s["ShardId"] for s in shards if s["ShardId"] not in known)
