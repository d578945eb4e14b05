"""In-memory twin of the Kinesis bus, for unit tests of service loops.

Same ports as the Kinesis adapters (`EventSink`, `RawSink`, `RecordSource`);
records are hashed to shards by partition key like Kinesis (MD5), sequence
numbers increase per shard. Integration tests use the real boto3 adapters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from callstream.bus.ports import Record
from callstream.contract import Contract, default_contract
from callstream.events import Event, partition_key


@dataclass
class MemoryStream:
    """One stream: shards of (sequence, partition key, data)."""

    name: str
    shard_count: int = 1
    shards: list[list[Record]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.shards = [[] for _ in range(self.shard_count)]

    def append(self, key: str, data: bytes) -> Record:
        """Store one record on the shard its key hashes to."""
        index = int(hashlib.md5(key.encode()).hexdigest(), 16) % self.shard_count
        shard = self.shards[index]
        record = Record(self.name, f"shardId-{index:012d}", str(len(shard) + 1), key, data)
        shard.append(record)
        return record


class MemoryPublisher:
    """EventSink and RawSink over a MemoryStream."""

    def __init__(self, stream: MemoryStream, contract: Contract | None = None) -> None:
        self.target = stream
        self.stream = stream.name
        self.contract = contract or default_contract()

    def publish(self, events: Sequence[Event]) -> None:
        """Encode and append events."""
        self.put_raw([(partition_key(e), self.contract.encode(e)) for e in events])

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Append framed records."""
        for key, data in items:
            self.target.append(key, data)


class MemorySource:
    """RecordSource over every shard of a MemoryStream, with checkpoints kept in a dict."""

    def __init__(
        self, stream: MemoryStream, checkpoints: dict[str, tuple[str, bool]] | None = None
    ) -> None:
        self.target = stream
        self.stream = stream.name
        self.checkpoints = checkpoints if checkpoints is not None else {}
        self._next: dict[int, int] = {}
        for index in range(stream.shard_count):
            self._next[index] = self._start(index)

    def poll(self) -> list[Record]:
        """Every record appended since the last poll, shard by shard."""
        out: list[Record] = []
        for index, shard in enumerate(self.target.shards):
            out.extend(shard[self._next[index] :])
            self._next[index] = len(shard)
        return out

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        """Remember where the shard resumes."""
        self.checkpoints[shard_id] = (sequence_number, inclusive)

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        """Poll this shard again from this record (inclusive)."""
        index = int(shard_id.rsplit("-", 1)[-1])
        self._next[index] = int(sequence_number) - 1

    def close(self) -> None:
        """Nothing to release."""

    def _start(self, index: int) -> int:
        saved = self.checkpoints.get(f"shardId-{index:012d}")
        if saved is None:
            return 0
        sequence, inclusive = saved
        return int(sequence) - 1 if inclusive else int(sequence)
