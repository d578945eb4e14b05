"""Follow a stream from its start without leases or checkpoints (CLI, demo, tests).

Reads every shard from TRIM_HORIZON (or LATEST) and yields decoded events;
undecodable records are yielded as the PoisonRecordError that explains them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from callstream.contract import Contract, default_contract
from callstream.errors import PoisonRecordError
from callstream.events import Event


class StreamTail:
    """Polls every shard of one stream."""

    def __init__(
        self, kinesis: Any, stream: str, *, latest: bool = False, contract: Contract | None = None
    ) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.contract = contract or default_contract()
        self._iterators: dict[str, str | None] = {}
        self._kind = "LATEST" if latest else "TRIM_HORIZON"

    def poll(self) -> list[Event | PoisonRecordError]:
        """Everything that arrived on any shard since the last poll."""
        self._discover()
        out: list[Event | PoisonRecordError] = []
        for shard_id, iterator in list(self._iterators.items()):
            if iterator is None:
                continue
            response = self.kinesis.get_records(ShardIterator=iterator, Limit=1000)
            self._iterators[shard_id] = response.get("NextShardIterator")
            for record in response["Records"]:
                try:
                    out.append(self.contract.decode(record["Data"]))
                except PoisonRecordError as e:
                    out.append(e)
        return out

    def follow(self, interval_s: float = 0.2) -> Iterator[Event | PoisonRecordError]:
        """Poll forever, yielding as records arrive."""
        while True:
            batch = self.poll()
            yield from batch
            if not batch:
                time.sleep(interval_s)

    def _discover(self) -> None:
        shards = self.kinesis.list_shards(StreamName=self.stream)["Shards"]
        for shard in shards:
            if shard["ShardId"] not in self._iterators:
                self._iterators[shard["ShardId"]] = self.kinesis.get_shard_iterator(
                    StreamName=self.stream, ShardId=shard["ShardId"], ShardIteratorType=self._kind
                )["ShardIterator"]
