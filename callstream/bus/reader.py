"""How a leased source reads its shards: the `ShardReader` port and what passes through it.

`KinesisSource` (`consumer.py`) decides which shards to read and from where;
a `ShardReader` reads them: `PollingReader` (`polling.py`, GetRecords) or
`FanOutReader` (`fanout.py`, SubscribeToShard). Both take `ShardRead`s (a
shard, the holding of its lease, its start `Position`) and return `Batch`es
tagged with the holding they were read for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from callstream.bus.leases import Lease
from callstream.bus.ports import Record

SHARD_END = "SHARD_END"  # the checkpoint of a closed shard read to its end


@dataclass(frozen=True)
class Position:
    """Where reading a shard starts: TRIM_HORIZON, or at or after a sequence number."""

    kind: str
    sequence_number: str | None = None

    @classmethod
    def of_lease(cls, lease: Lease) -> Position:
        """The lease's checkpoint (inclusive or not), or the shard's start without one."""
        if lease.checkpoint and lease.checkpoint != SHARD_END:
            kind = "AT_SEQUENCE_NUMBER" if lease.checkpoint_inclusive else "AFTER_SEQUENCE_NUMBER"
            return cls(kind, lease.checkpoint)
        return cls("TRIM_HORIZON")

    def iterator_args(self) -> dict[str, str]:
        """GetShardIterator's arguments for this position."""
        args = {"ShardIteratorType": self.kind}
        if self.sequence_number is not None:
            args["StartingSequenceNumber"] = self.sequence_number
        return args

    def starting_position(self) -> dict[str, str]:
        """SubscribeToShard's `StartingPosition` for this position."""
        position = {"Type": self.kind}
        if self.sequence_number is not None:
            position["SequenceNumber"] = self.sequence_number
        return position


@dataclass(frozen=True)
class ShardRead:
    """A shard to read for one holding of its lease, and where that holding starts."""

    shard_id: str
    holding: int
    start: Position


@dataclass(frozen=True)
class Batch:
    """Records a reader read for one holding of a shard; `at_end`: the shard is closed and
    nothing follows these records."""

    shard_id: str
    holding: int
    records: list[Record] = field(default_factory=list)
    at_end: bool = False
    millis_behind: float | None = None


class ShardReader(Protocol):
    """How a `KinesisSource` reads the shards it holds (polling or enhanced fan-out)."""

    def follow(self, reads: list[ShardRead]) -> None:
        """These holdings are the ones to read now; forget any other. Called under the
        source's lock: must not block or call Kinesis."""

    def read(self, reads: list[ShardRead]) -> list[Batch]:
        """What arrived for these holdings, waiting a little if nothing has; never raises for
        a failed Kinesis request (it is logged and tried again at a later read)."""

    def rewind(self, read: ShardRead) -> None:
        """Read this holding again from `read.start` from the next read on. Called under the
        source's lock: must not block or call Kinesis."""

    def release(self, shard_id: str) -> None:
        """This shard's holding ended; stop reading it. Called under the source's lock."""

    def close(self) -> None:
        """Stop reading every shard."""
