"""The fan-out source against the emulator's SubscribeToShard, quotas on.

Real boto3 (`subscribe_to_shard`'s event stream), the emulator's consumer
registry and per-consumer 2 MiB/s, short subscriptions so renewals happen
during a test; leases in the emulator's DynamoDB.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.config import Config

from callstream.bus.consumer import KinesisSource
from callstream.bus.fanout import SUBSCRIPTIONS, FanOutSource, register_consumer
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.bus.polling import PollingReader, read_interval_s
from callstream.bus.ports import Record
from callstream.metrics import Metrics
from callstream_emulator.emulator import Emulator

pytestmark = pytest.mark.integration
LEASE_MS = 3000
READS = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20)


@pytest.fixture
def bus(emulator: Emulator, aws_session: Any) -> dict[str, Any]:
    assert emulator.quotas.enabled, "these tests run with Kinesis's quotas on"
    emulator.fanout.settings.configure(subscription_s=1.5)  # aws_env's teardown restores it
    kinesis = aws_session.client("kinesis")
    leases = LeaseTable(aws_session.client("dynamodb"), f"efo-{uuid.uuid4().hex[:8]}")
    leases.ensure_table()
    return {
        "kinesis": kinesis,
        "reads": aws_session.client("kinesis", config=READS),
        "leases": leases,
    }


def _stream(kinesis: Any, shards: int = 1) -> str:
    name = f"efo-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return name


def _source(
    bus: dict[str, Any], stream: str, worker: str, group: str = "app", **kw: Any
) -> FanOutSource:
    arn = register_consumer(bus["kinesis"], stream, group)
    return FanOutSource(
        bus["reads"],
        bus["leases"],
        stream=stream,
        group=group,
        worker_id=worker,
        consumer_arn=arn,
        lease_ms=LEASE_MS,
        **kw,
    )


def _items(key: str, start: int, count: int) -> list[tuple[str, bytes]]:
    return [(key, f"{key}:{i:05d}".encode()) for i in range(start, start + count)]


def _read_until(
    sources: list[Any], done: Callable[[list[Record]], bool], timeout_s: float = 20.0
) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + timeout_s
    while not done(got) and time.monotonic() < deadline:
        for source in sources:
            got.extend(source.poll())
    return got


def test_records_arrive_in_order_across_renewals_without_gap_or_repeat(
    bus: dict[str, Any],
) -> None:
    stream = _stream(bus["kinesis"])
    publisher = KinesisPublisher(bus["kinesis"], stream)
    metrics = Metrics("test", "off")
    source = _source(bus, stream, "a", metrics=metrics)
    sent: list[bytes] = []
    got: list[Record] = []
    for burst in range(5):  # 5 bursts 0.8 s apart: the 1.5 s subscriptions renew between them
        items = _items("call", burst * 40, 40)
        publisher.put_raw(items)
        sent += [data for _, data in items]
        got += _read_until([source], lambda g: len(g) >= 40, 10)
        time.sleep(0.8)
    assert [r.data for r in got] == sent
    assert len({r.sequence_number for r in got}) == len(sent)
    (shard,) = source.held_shards
    assert (metrics.value(SUBSCRIPTIONS, shard=shard) or 0) >= 3  # renewed at least twice
    source.close()


def test_a_takeover_resubscribes_from_the_checkpoint_of_the_instance_that_left(
    bus: dict[str, Any],
) -> None:
    stream = _stream(bus["kinesis"])
    publisher = KinesisPublisher(bus["kinesis"], stream)
    first = _source(bus, stream, "first")
    publisher.put_raw(_items("call", 0, 30))
    read = _read_until([first], lambda g: len(g) >= 30)
    first.checkpoint(read[19].shard_id, read[19].sequence_number, inclusive=False)
    first.close()  # SIGTERM: leases released, its subscription closed
    publisher.put_raw(_items("call", 30, 10))
    second = _source(bus, stream, "second")
    again = _read_until([second], lambda g: len(g) >= 20)
    assert [r.data for r in again] == [data for _, data in _items("call", 20, 20)]
    second.close()


def test_a_call_across_a_shard_split_is_read_parent_first_then_the_child(
    bus: dict[str, Any],
) -> None:
    kinesis = bus["kinesis"]
    stream = _stream(kinesis)
    publisher = KinesisPublisher(kinesis, stream)
    source = _source(bus, stream, "a")
    publisher.put_raw(_items("call", 0, 10))
    got = _read_until([source], lambda g: len(g) >= 10)
    (parent,) = kinesis.list_shards(StreamName=stream)["Shards"]
    middle = str(int(parent["HashKeyRange"]["EndingHashKey"]) // 2)
    kinesis.split_shard(
        StreamName=stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=middle
    )
    kinesis.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 0.1})
    publisher.put_raw(_items("call", 10, 10))
    got += _read_until([_Checkpointing(source)], lambda g: len(g) >= 10, 30)
    assert [r.data for r in got] == [data for _, data in _items("call", 0, 20)]
    assert {r.shard_id for r in got[:10]} == {parent["ShardId"]}
    assert parent["ShardId"] not in {r.shard_id for r in got[10:]}
    source.close()


class _Checkpointing:
    """A source whose every poll checkpoints past what it returned, as the loop does."""

    def __init__(self, source: FanOutSource) -> None:
        self.source = source

    def poll(self) -> list[Record]:
        records = self.source.poll()
        for shard_id in {r.shard_id for r in records}:
            last = [r for r in records if r.shard_id == shard_id][-1]
            self.source.checkpoint(shard_id, last.sequence_number, inclusive=False)
        for shard_id in self.source.held_shards:  # a drained parent with nothing new
            self.source.checkpoint(shard_id, "0", inclusive=False)
        time.sleep(0.05)
        return records


def test_four_groups_on_one_shard_each_read_everything_two_of_them_with_fan_out(
    bus: dict[str, Any], emulator: Emulator
) -> None:
    stream = _stream(bus["kinesis"])
    publisher = KinesisPublisher(bus["kinesis"], stream)
    fanned = [_source(bus, stream, "w", group) for group in ("transcriber", "extra-a")]
    polled = [  # 2 polling groups share the shard's 5 reads/s: each reads every 0.4 s
        KinesisSource(
            bus["reads"],
            bus["leases"],
            stream=stream,
            group=group,
            worker_id="w",
            lease_ms=LEASE_MS,
            reader=PollingReader(bus["reads"], stream, interval_s=read_interval_s(2)),
        )
        for group in ("recorder", "extra-b")
    ]
    before = emulator.quotas.throttle_count("GetRecords")
    sent = _items("call", 0, 200)
    stop = threading.Event()

    def produce() -> None:
        for i in range(0, 200, 8):  # a call's 16 records/s for 12.5 s
            publisher.put_raw(sent[i : i + 8])
            time.sleep(0.5)
        stop.set()

    producer = threading.Thread(target=produce)
    producer.start()
    got: dict[int, list[bytes]] = {i: [] for i in range(4)}
    sources: list[Any] = [*fanned, *polled]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and any(len(v) < 200 for v in got.values()):
        for i, source in enumerate(sources):
            got[i] += [r.data for r in source.poll()]
    producer.join(30)
    for records in got.values():
        assert records == [data for _, data in sent]
    assert emulator.quotas.throttle_count("GetRecords") == before  # within the shared budget
    for source in sources:
        source.close()
