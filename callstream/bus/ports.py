"""Ports of the bus: what a service needs to publish and consume records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from callstream.events import Event


@dataclass(frozen=True, slots=True)
class Record:
    """One record read from a stream shard."""

    stream: str
    shard_id: str
    sequence_number: str
    partition_key: str
    data: bytes


class EventSink(Protocol):
    """Publishes events to one stream, partitioned by contact."""

    stream: str

    def publish(self, events: Sequence[Event]) -> None:
        """Durably publish all events or raise; order per contact is kept by sequence fields.

        A raised error may say which events were stored nonetheless
        (`callstream.errors.stored_of`): the caller resends only the others."""


class RawSink(Protocol):
    """Publishes already-framed records (dead letters, redrive)."""

    stream: str

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Durably publish (partition key, bytes) pairs or raise."""


class RecordSource(Protocol):
    """Yields records of the shards this instance holds, and takes checkpoints."""

    stream: str

    def poll(self) -> list[Record]:
        """Records that arrived since the last poll, in shard order (may be empty)."""

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        """Record that processing of `shard_id` may restart at (inclusive) or after this record."""

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        """Return `shard_id`'s records again from this one (inclusive) at the next poll;
        a shard no longer held is ignored. Raises RetryableError if it cannot now."""

    def close(self) -> None:
        """Release held shards so another instance can take them at once."""
