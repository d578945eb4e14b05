"""The emulator's enhanced fan-out, through an unchanged boto3 `subscribe_to_shard`.

Consumers go CREATING -> ACTIVE (DELETING when deregistered); SubscribeToShard
answers an `initial-response` then SubscribeToShardEvents as records arrive,
ends after the subscription time, resumes from the continuation sequence
number without a gap or a repeat, ends a closed shard with its ChildShards,
refuses a second concurrent subscription with ResourceInUseException, and
paces each consumer at its own 2 MiB/s per shard.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EventStreamError

from callstream_emulator.emulator import Emulator

pytestmark = pytest.mark.integration
SHARD = "shardId-000000000000"
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20)


@pytest.fixture
def kinesis(aws_session: Any) -> Any:
    return aws_session.client("kinesis", config=NO_RETRIES)


@pytest.fixture
def fanout(emulator: Emulator, aws_env: dict[str, str]) -> Any:
    """The emulator's fan-out settings; aws_env's faults.clear() restores them afterwards."""
    return emulator.fanout.settings


def _stream(kinesis: Any, shards: int = 1) -> tuple[str, str]:
    name = f"efo-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    arn = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamARN"]
    return name, arn


def _status(kinesis: Any, consumer: str) -> str:
    described = kinesis.describe_stream_consumer(ConsumerARN=consumer)
    return str(described["ConsumerDescription"]["ConsumerStatus"])


def _wait_active(kinesis: Any, *consumers: str) -> None:
    deadline = time.monotonic() + 10
    while any(_status(kinesis, c) != "ACTIVE" for c in consumers):
        assert time.monotonic() < deadline, "consumer never became ACTIVE"
        time.sleep(0.05)


def _register(kinesis: Any, stream_arn: str, name: str) -> str:
    answer = kinesis.register_stream_consumer(StreamARN=stream_arn, ConsumerName=name)
    return str(answer["Consumer"]["ConsumerARN"])


def _active_consumer(kinesis: Any, stream_arn: str, name: str = "app") -> str:
    consumer = _register(kinesis, stream_arn, name)
    _wait_active(kinesis, consumer)
    return consumer


def _subscribe(kinesis: Any, consumer: str, position: dict[str, Any], shard: str = SHARD) -> Any:
    return kinesis.subscribe_to_shard(
        ConsumerARN=consumer, ShardId=shard, StartingPosition=position
    )["EventStream"]


def _events(stream: Any) -> Iterator[dict[str, Any]]:
    for event in stream:
        yield event["SubscribeToShardEvent"]


def _put(kinesis: Any, name: str, count: int, tag: str = "r") -> list[str]:
    result = kinesis.put_records(
        StreamName=name,
        Records=[{"Data": f"{tag}{i}".encode(), "PartitionKey": "k"} for i in range(count)],
    )
    assert result["FailedRecordCount"] == 0
    return [r["SequenceNumber"] for r in result["Records"]]


# -- the consumer registry ------------------------------------------------------------------


def test_a_registered_consumer_is_creating_then_active_with_a_timestamped_arn(kinesis: Any) -> None:
    _, stream_arn = _stream(kinesis)
    consumer = kinesis.register_stream_consumer(StreamARN=stream_arn, ConsumerName="app")[
        "Consumer"
    ]
    assert consumer["ConsumerStatus"] == "CREATING"
    assert re.fullmatch(rf"{re.escape(stream_arn)}/consumer/app:\d{{10}}", consumer["ConsumerARN"])
    arn = consumer["ConsumerARN"]
    _wait_active(kinesis, arn)
    by_name = kinesis.describe_stream_consumer(StreamARN=stream_arn, ConsumerName="app")
    assert by_name["ConsumerDescription"]["ConsumerARN"] == arn
    assert by_name["ConsumerDescription"]["StreamARN"] == stream_arn
    listed = kinesis.list_stream_consumers(StreamARN=stream_arn)["Consumers"]
    assert [(c["ConsumerName"], c["ConsumerStatus"]) for c in listed] == [("app", "ACTIVE")]


def test_consumer_names_are_unique_per_stream_and_need_a_stream(kinesis: Any) -> None:
    _, stream_arn = _stream(kinesis)
    kinesis.register_stream_consumer(StreamARN=stream_arn, ConsumerName="app")
    with pytest.raises(ClientError) as twice:
        kinesis.register_stream_consumer(StreamARN=stream_arn, ConsumerName="app")
    assert twice.value.response["Error"]["Code"] == "ResourceInUseException"
    with pytest.raises(ClientError) as missing:
        kinesis.register_stream_consumer(StreamARN=stream_arn + "-gone", ConsumerName="app")
    assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_deregistering_by_name_removes_that_consumer_only(kinesis: Any) -> None:
    _, stream_arn = _stream(kinesis)
    kept = _active_consumer(kinesis, stream_arn, "kept")
    gone = _active_consumer(kinesis, stream_arn, "gone")
    kinesis.deregister_stream_consumer(StreamARN=stream_arn, ConsumerName="gone")
    status = kinesis.describe_stream_consumer(ConsumerARN=gone)["ConsumerDescription"]
    assert status["ConsumerStatus"] == "DELETING"
    deadline = time.monotonic() + 10
    while len(kinesis.list_stream_consumers(StreamARN=stream_arn)["Consumers"]) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listed = kinesis.list_stream_consumers(StreamARN=stream_arn)["Consumers"]
    assert [c["ConsumerARN"] for c in listed] == [kept]
    with pytest.raises(ClientError) as raised:
        kinesis.describe_stream_consumer(ConsumerARN=gone)
    assert raised.value.response["Error"]["Code"] == "ResourceNotFoundException"


# -- subscribing ------------------------------------------------------------------------------


def test_subscribe_errors_carry_the_real_exception_codes(kinesis: Any) -> None:
    _, stream_arn = _stream(kinesis)
    creating = _register(kinesis, stream_arn, "new")
    _expect_refused(kinesis, creating, SHARD, {"Type": "LATEST"}, "ResourceInUseException")
    active = _active_consumer(kinesis, stream_arn)
    cases = [
        (stream_arn + "/consumer/nobody:1", SHARD, {"Type": "LATEST"}, "ResourceNotFoundException"),
        (active, "shardId-000000000009", {"Type": "LATEST"}, "ResourceNotFoundException"),
        (active, SHARD, {"Type": "AT_SEQUENCE_NUMBER"}, "InvalidArgumentException"),
        (active, SHARD, {"Type": "SOMEWHERE"}, "InvalidArgumentException"),
    ]
    for consumer, shard, position, code in cases:
        _expect_refused(kinesis, consumer, shard, position, code)


def _expect_refused(
    kinesis: Any, consumer: str, shard: str, position: dict[str, Any], code: str
) -> None:
    with pytest.raises(ClientError) as raised:
        _subscribe(kinesis, consumer, position, shard)
    assert raised.value.response["Error"]["Code"] == code, (position, shard)
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_records_are_pushed_as_they_arrive(kinesis: Any) -> None:
    name, stream_arn = _stream(kinesis)
    stream = _subscribe(kinesis, _active_consumer(kinesis, stream_arn), {"Type": "TRIM_HORIZON"})
    events = _events(stream)
    first = next(events)  # sent at once, even with nothing to send
    assert first["Records"] == [] and first["MillisBehindLatest"] == 0
    assert first["ContinuationSequenceNumber"]
    latencies = []
    for index in range(3):
        time.sleep(0.3)
        written = time.monotonic()
        kinesis.put_record(StreamName=name, Data=f"live{index}".encode(), PartitionKey="k")
        event = next(events)
        latencies.append(time.monotonic() - written)
        assert [r["Data"] for r in event["Records"]] == [f"live{index}".encode()]
        assert event["ContinuationSequenceNumber"] == event["Records"][-1]["SequenceNumber"]
    stream.close()
    assert max(latencies) < 0.25, latencies


def test_every_starting_position_starts_where_aws_says(kinesis: Any) -> None:
    name, stream_arn = _stream(kinesis)
    first = _put(kinesis, name, 3, "a")
    time.sleep(0.05)
    boundary = time.time()
    time.sleep(0.05)
    later = _put(kinesis, name, 2, "b")
    positions = {
        "TRIM_HORIZON": ({"Type": "TRIM_HORIZON"}, first + later),
        "AT": ({"Type": "AT_SEQUENCE_NUMBER", "SequenceNumber": first[1]}, first[1:] + later),
        "AFTER": ({"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": first[1]}, first[2:] + later),
        "AT_TIMESTAMP": ({"Type": "AT_TIMESTAMP", "Timestamp": boundary}, later),
        "LATEST": ({"Type": "LATEST"}, []),
    }
    consumers = {label: _register(kinesis, stream_arn, label) for label in positions}
    _wait_active(kinesis, *consumers.values())
    for label, (position, expected) in positions.items():
        stream = _subscribe(kinesis, consumers[label], position)
        event = next(_events(stream))
        stream.close()
        assert [r["SequenceNumber"] for r in event["Records"]] == expected, label


def test_a_subscription_ends_and_resumes_from_the_continuation_without_gap_or_repeat(
    kinesis: Any, fanout: Any
) -> None:
    fanout.configure(subscription_s=1.2, idle_event_s=0.3)
    name, stream_arn = _stream(kinesis)
    consumer = _active_consumer(kinesis, stream_arn)
    written: list[str] = []
    stop = threading.Event()

    def write() -> None:
        index = 0
        while not stop.is_set():
            written.extend(_put(kinesis, name, 5, f"w{index}-"))
            index += 1
            time.sleep(0.05)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    received: list[str] = []
    position: dict[str, Any] = {"Type": "TRIM_HORIZON"}
    subscriptions = 0
    started = time.monotonic()
    while time.monotonic() - started < 3.5:
        opened = time.monotonic()
        for event in _events(_subscribe(kinesis, consumer, position)):
            received += [r["SequenceNumber"] for r in event["Records"]]
            continuation = event["ContinuationSequenceNumber"]
            position = {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": continuation}
        assert 1.1 <= time.monotonic() - opened < 2.5  # ended by the emulator, on time
        subscriptions += 1
    stop.set()
    writer.join(5)
    for event in _events(_subscribe(kinesis, consumer, position)):
        received += [r["SequenceNumber"] for r in event["Records"]]
        if event["MillisBehindLatest"] == 0 and len(received) >= len(written):
            break
    assert subscriptions >= 2
    assert received == written  # every record once, in order


def test_a_second_subscription_is_in_use_then_takes_over(kinesis: Any, fanout: Any) -> None:
    fanout.configure(takeover_s=1.5)  # AWS: 5 s
    _, stream_arn = _stream(kinesis)
    consumer = _active_consumer(kinesis, stream_arn)
    first = _subscribe(kinesis, consumer, {"Type": "LATEST"})
    events = _events(first)
    next(events)
    with pytest.raises(ClientError) as raised:
        _subscribe(kinesis, consumer, {"Type": "LATEST"})
    assert raised.value.response["Error"]["Code"] == "ResourceInUseException"
    time.sleep(1.6)
    second = _subscribe(kinesis, consumer, {"Type": "LATEST"})
    with pytest.raises(EventStreamError) as taken:
        for _ in events:
            pass
    assert taken.value.response["Error"]["Code"] == "ResourceInUseException"
    second.close()


def test_subscribe_to_shard_is_limited_to_one_call_a_second(kinesis: Any, fanout: Any) -> None:
    fanout.configure(takeover_s=0.05)  # so the rate limit, not the in-use rule, answers
    _, stream_arn = _stream(kinesis)
    consumer = _active_consumer(kinesis, stream_arn)
    _subscribe(kinesis, consumer, {"Type": "LATEST"}).close()
    time.sleep(0.1)
    with pytest.raises(ClientError) as raised:
        _subscribe(kinesis, consumer, {"Type": "LATEST"})
    error = raised.value.response["Error"]
    assert error["Code"] == "LimitExceededException", error
    time.sleep(0.9)
    _subscribe(kinesis, consumer, {"Type": "LATEST"}).close()


def test_a_split_parent_ends_its_subscription_with_the_child_shards(kinesis: Any) -> None:
    name, stream_arn = _stream(kinesis)
    sequences = _put(kinesis, name, 4)
    kinesis.split_shard(StreamName=name, ShardToSplit=SHARD, NewStartingHashKey=str(2**127))
    stream = _subscribe(kinesis, _active_consumer(kinesis, stream_arn), {"Type": "TRIM_HORIZON"})
    events = list(_events(stream))  # the stream ends by itself at the shard's end
    assert [r["SequenceNumber"] for e in events for r in e["Records"]] == sequences
    last = events[-1]
    assert "ContinuationSequenceNumber" not in last
    children = sorted(last["ChildShards"], key=lambda c: c["ShardId"])
    assert [c["ShardId"] for c in children] == ["shardId-000000000001", "shardId-000000000002"]
    assert all(c["ParentShards"] == [SHARD] for c in children)


def test_an_idle_subscription_still_sends_events_with_the_same_continuation(
    kinesis: Any, fanout: Any
) -> None:
    fanout.configure(idle_event_s=0.2)
    name, stream_arn = _stream(kinesis)
    (sequence,) = _put(kinesis, name, 1)
    stream = _subscribe(kinesis, _active_consumer(kinesis, stream_arn), {"Type": "TRIM_HORIZON"})
    events = _events(stream)
    started = time.monotonic()
    got = [next(events) for _ in range(4)]
    stream.close()
    assert [len(e["Records"]) for e in got] == [1, 0, 0, 0]
    assert {e["ContinuationSequenceNumber"] for e in got} == {sequence}
    assert 0.5 <= time.monotonic() - started < 2.0


def test_each_consumer_is_paced_at_its_own_2_mib_a_second(emulator: Emulator, kinesis: Any) -> None:
    name, stream_arn = _stream(kinesis)
    record = 100 * 1024
    with _stopped_quota_clock(emulator) as clock:  # write 5 MiB without waiting 5 s for it
        for _ in range(5):
            kinesis.put_records(
                StreamName=name,
                Records=[{"Data": b"d" * record, "PartitionKey": "k"} for _ in range(10)],
            )
            clock.advance(1.0)
    consumers = [_register(kinesis, stream_arn, f"c{i}") for i in range(2)]
    _wait_active(kinesis, *consumers)
    took: dict[str, float] = {}

    def drain(consumer: str) -> None:
        started, got = time.monotonic(), 0
        for event in _events(_subscribe(kinesis, consumer, {"Type": "TRIM_HORIZON"})):
            got += sum(len(r["Data"]) for r in event["Records"])
            if got >= 50 * record:
                break
        took[consumer] = time.monotonic() - started

    threads = [threading.Thread(target=drain, args=(c,)) for c in consumers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    # 5 MiB at 2 MiB/s after a 2 MiB burst: about 1.5 s each, side by side (not 3 s).
    assert len(took) == 2
    assert all(1.2 <= t < 2.6 for t in took.values()), took


class _ManualClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def _stopped_quota_clock(emulator: Emulator) -> Iterator[_ManualClock]:
    """The quotas' clock moves only when told, inside the block."""
    clock, previous = _ManualClock(), emulator.quotas.clock
    emulator.quotas.clock = clock
    try:
        yield clock
    finally:
        emulator.quotas.clock = previous
