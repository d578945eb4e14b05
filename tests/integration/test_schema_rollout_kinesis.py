"""Schema rollouts on real Kinesis (the emulator): a paused shard is re-read from its stuck record.

A new producer writes AudioChunkCaptured v2 to a two-shard stream; an old
consumer (no v2 schema file) pauses the shard that carries it, dead-letters
nothing, and keeps reading the other shard. Upgraded in place, it rewinds the
paused shard (GetShardIterator AT_SEQUENCE_NUMBER) and handles every record
exactly once. See docs/schema-rollouts.md.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from callstream.bus.consumer import KinesisSource
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.bus.ports import Record
from callstream.contract import SCHEMAS_DIR, Contract
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream.metrics import SHARDS_PAUSED, Metrics
from callstream.runtime import ServiceLoop, ShardPauses

pytestmark = pytest.mark.integration
NEW = Contract()


class Seen:
    """Test handler: remembers every handled record; a call is settled at its CallEnded."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.ended: set[str] = set()

    def handle(self, event: Event, record: Record) -> None:
        self.seen.append((record.shard_id, record.sequence_number))
        if isinstance(event, CallEnded):
            self.ended.add(event.contact_id)

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.ended

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None


def _old_contract(tmp_path: Path) -> Contract:
    for path in SCHEMAS_DIR.glob("*.avsc"):
        if path.name != "AudioChunkCaptured.v2.avsc":
            shutil.copy(path, tmp_path / path.name)
    return Contract(tmp_path)


def _stream(kinesis: Any, prefix: str, shards: int) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return name


def _contact_in(low_half: bool, prefix: str) -> str:
    """A contact whose MD5 hash key falls in the first (or second) of two equal shards."""
    for n in range(1000):
        contact = f"{prefix}-{n}"
        if (int(hashlib.md5(contact.encode()).hexdigest(), 16) < 2**127) == low_half:
            return contact
    raise AssertionError("no contact found")


def _call(contact: str, chunks: int) -> list[Event]:
    audio: list[Event] = [
        AudioChunkCaptured(
            contact_id=contact,
            track=Track.TO_CUSTOMER,
            sequence=i,
            sample_offset=i * 1024,
            offset_ms=i * 128,
            start_time_ms=0,
            pcm=b"\x02\x00" * 1024,
            fragment_number="7",
            gap_before_ms=10,
            gap_total_ms=10 * (i + 1),
        )
        for i in range(chunks)
    ]
    return [CallStarted(contact, "arn", 0), *audio, CallEnded(contact, EndReason.END_OF_STREAM, 0)]


def _all_records(kinesis: Any, stream: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        records = kinesis.get_records(ShardIterator=iterator, Limit=1000)["Records"]
        out += [(shard["ShardId"], r["SequenceNumber"]) for r in records]
    return out


def _rounds_until(loop: ServiceLoop, done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loop.process(loop.source.poll())
        loop.checkpoint()
        if done():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_an_old_consumer_pauses_the_shard_on_kinesis_and_resumes_it_once_upgraded(
    aws_session: Any, tmp_path: Path
) -> None:
    kinesis = aws_session.client("kinesis")
    stream, dead = _stream(kinesis, "rollout", 2), _stream(kinesis, "rollout-dead", 1)
    leases = LeaseTable(aws_session.client("dynamodb"), f"leases-{uuid.uuid4().hex[:8]}")
    leases.ensure_table()
    source = KinesisSource(
        kinesis, leases, stream=stream, group="old", worker_id="w", lease_ms=5000
    )
    handler, metrics = Seen(), Metrics("test", "prometheus")
    loop = ServiceLoop(
        "old",
        source,
        handler,
        KinesisPublisher(kinesis, dead),
        contract=_old_contract(tmp_path),
        metrics=metrics,
    )
    loop.pauses = ShardPauses(base_s=0.2, cap_s=0.5)
    producer = KinesisPublisher(kinesis, stream, NEW)
    paused, other = _contact_in(True, "paused"), _contact_in(False, "other")
    producer.publish(_call(paused, chunks=3) + _call(other, chunks=0))
    try:
        _rounds_until(loop, lambda: metrics.value(SHARDS_PAUSED) == 1 and len(handler.seen) >= 3)
        producer.publish(_call(_contact_in(True, "later"), 2) + _call(_contact_in(False, "l"), 0))
        time.sleep(1.5)  # several retries with the old contract: each pauses again
        _rounds_until(loop, lambda: len(handler.seen) == 5)

        totals = Counter(shard for shard, _ in _all_records(kinesis, stream))
        handled = Counter(shard for shard, _ in handler.seen)
        # the paused call's CallStarted only, of 9; the other shard: all of its 4
        assert sorted((handled[shard], totals[shard]) for shard in totals) == [(1, 9), (4, 4)]
        assert _all_records(kinesis, dead) == []
        assert metrics.value(SHARDS_PAUSED) == 1

        loop.contract = NEW  # the consumer is upgraded
        expected = _all_records(kinesis, stream)
        _rounds_until(loop, lambda: len(handler.seen) >= len(expected))
        _rounds_until(loop, lambda: metrics.value(SHARDS_PAUSED) == 0)
    finally:
        source.close()
    assert sorted(handler.seen) == sorted(expected)  # every record, each exactly once
    assert _all_records(kinesis, dead) == []
    last = {shard: max((s for sh, s in expected if sh == shard), key=int) for shard in totals}
    saved = {
        lease.shard_id: (lease.checkpoint, lease.checkpoint_inclusive)
        for lease in leases.scan("old/")
    }
    assert saved == {shard: (sequence, False) for shard, sequence in last.items()}
