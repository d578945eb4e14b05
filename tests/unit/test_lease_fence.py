"""The lease fence: a shard this instance cannot prove it holds is neither read nor checkpointed.

Real boto3 against the embedded emulator. Most sources get a 60 s lease and a
hand-driven monotonic clock, so their heartbeat thread never beats during a
test (it waits a third of a lease of real time): `heartbeat()` calls are the
beats, and not calling it is a starved heartbeat or a frozen process
(SIGSTOP). Lease expiry in the table is wall-clock, moved by the `wall`
fixture for the instance that takes over.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError

from callstream.bus import consumer, leases
from callstream.bus.consumer import KinesisSource
from callstream.bus.leases import LeaseTable, lease_client
from callstream.bus.ports import Record
from callstream.metrics import LEASES_FENCED, Metrics

pytestmark = pytest.mark.integration
LEASE_MS = 60_000
PAST_THE_FENCE_S = 55.0  # 90% of the lease is 54 s


class _Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Wall:
    """Moves the wall clock the lease table's expiry times are written and judged by."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset_ms = 0
        for module in (leases, consumer):
            monkeypatch.setattr(module, "now_ms", self.now_ms)

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def advance(self, seconds: float) -> None:
        self.offset_ms += int(seconds * 1000)


class _BreakableTable:
    """A DynamoDB client that, once broken, times out on every request."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.broken = False
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        if not self.broken:
            return getattr(self.client, name)

        def timed_out(**_: Any) -> None:
            self.calls += 1
            raise ReadTimeoutError(endpoint_url="http://lease-table")

        return timed_out


class _HeldKinesis:
    """A Kinesis client whose GetRecords, once `hold` is set, waits until `release` is set."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_records(self, **kwargs: Any) -> Any:
        if self.hold.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never released GetRecords"
        return self.client.get_records(**kwargs)


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> _Wall:
    return _Wall(monkeypatch)


@pytest.fixture
def stream(aws_session: Any) -> tuple[Any, str]:
    kinesis = aws_session.client("kinesis")
    name = f"fence-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return kinesis, name


@pytest.fixture
def table(aws_session: Any) -> LeaseTable:
    client = _BreakableTable(aws_session.client("dynamodb"))
    table = LeaseTable(client, f"fence-{uuid.uuid4().hex[:8]}")
    table.ensure_table()
    return table


def _source(kinesis: Any, table: LeaseTable, stream: str, worker: str, **kw: Any) -> KinesisSource:
    kw.setdefault("lease_ms", LEASE_MS)
    return KinesisSource(kinesis, table, stream=stream, group="app", worker_id=worker, **kw)


def _put(kinesis: Any, stream: str, *data: bytes) -> None:
    for item in data:
        kinesis.put_record(StreamName=stream, Data=item, PartitionKey="contact")


def _checkpoint_in_table(table: LeaseTable, stream: str) -> str | None:
    (lease,) = table.scan(f"app/{stream}/")
    return lease.checkpoint


def _data(records: list[Record]) -> list[bytes]:
    return [record.data for record in records]


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_heartbeat_renews_while_a_get_records_outlasts_the_lease(
    stream: tuple[Any, str], table: LeaseTable
) -> None:
    kinesis, name = stream
    lease_ms = 2000
    slow = _HeldKinesis(kinesis)
    source = _source(slow, table, name, "a", lease_ms=lease_ms)  # the real monotonic clock
    _put(kinesis, name, b"r1")
    slow.hold.set()
    returned: list[Record] = []
    polling = threading.Thread(target=lambda: returned.extend(source.poll()))
    polling.start()
    try:
        assert slow.entered.wait(10), "GetRecords was never called"
        (before,) = table.scan(f"app/{name}/")
        time.sleep(lease_ms / 1000 * 1.25)  # GetRecords is still running, past a lease
        renewed = _wait_for(lambda: table.scan(f"app/{name}/")[0].counter >= before.counter + 2, 10)
        (after,) = table.scan(f"app/{name}/")
        assert renewed, "no renewal while GetRecords ran: it holds the heartbeat's lock"
        assert after.owner == "a" and after.expires_at_ms > leases.now_ms()
    finally:
        slow.release.set()
        polling.join(10)
    assert _data(returned) == [b"r1"]  # renewed meanwhile, so not fenced
    source.close()


def test_an_unreachable_lease_table_fences_the_shard_after_the_lease(
    stream: tuple[Any, str], table: LeaseTable, caplog: pytest.LogCaptureFixture
) -> None:
    kinesis, name = stream
    clock, lost, metrics = _Clock(), list[str](), Metrics("test", "off")
    source = _source(
        kinesis, table, name, "a", clock=clock, on_shard_lost=lost.append, metrics=metrics
    )
    _put(kinesis, name, b"r1", b"r2")
    records = source.poll()
    assert _data(records) == [b"r1", b"r2"]
    shard = records[0].shard_id
    breakable: _BreakableTable = table.client
    breakable.broken = True
    with caplog.at_level(logging.WARNING, logger="callstream.bus.consumer"):
        for _ in range(2):
            clock.advance(20)
            source.heartbeat()  # times out: the renewal fails
    assert source.held_shards == [shard]  # not yet past its lease
    _put(kinesis, name, b"r3")
    clock.advance(PAST_THE_FENCE_S - 40)
    assert source.poll() == []  # r3 is not returned: the lease may be someone else's by now
    assert lost == [shard]
    assert source.held_shards == []
    breakable.broken = False  # reachable again: the fence still refuses the old records
    source.checkpoint(shard, records[-1].sequence_number, inclusive=False)
    assert _checkpoint_in_table(table, name) is None
    assert metrics.value(LEASES_FENCED, shard=shard) == 1
    assert "lease heartbeat failed 2 rounds in a row (1 held" in caplog.text
    source.close()


def test_records_returned_before_the_fence_fell_are_not_checkpointed(
    stream: tuple[Any, str], table: LeaseTable
) -> None:
    kinesis, name = stream
    clock, lost = _Clock(), list[str]()
    source = _source(kinesis, table, name, "a", clock=clock, on_shard_lost=lost.append)
    _put(kinesis, name, b"r1", b"r2")
    first, second = source.poll()
    source.checkpoint(first.shard_id, first.sequence_number, inclusive=False)
    assert _checkpoint_in_table(table, name) == first.sequence_number
    clock.advance(30)
    source.heartbeat()  # renewed: the fence now counts from here
    clock.advance(30)  # past the first take's fence, not the renewal's
    source.checkpoint(second.shard_id, second.sequence_number, inclusive=False)
    assert _checkpoint_in_table(table, name) == second.sequence_number
    _put(kinesis, name, b"r3")
    (third,) = source.poll()
    clock.advance(PAST_THE_FENCE_S)  # the heartbeat starves; the table is fine
    source.checkpoint(third.shard_id, third.sequence_number, inclusive=False)
    assert _checkpoint_in_table(table, name) == second.sequence_number
    assert source.poll() == []
    assert lost == [third.shard_id]
    source.close()


def test_a_frozen_instance_resumed_after_a_takeover_neither_reads_nor_checkpoints(
    stream: tuple[Any, str], table: LeaseTable, wall: _Wall
) -> None:
    kinesis, name = stream
    clock, lost = _Clock(), list[str]()
    frozen = _source(kinesis, table, name, "frozen", clock=clock, on_shard_lost=lost.append)
    _put(kinesis, name, b"r1", b"r2")
    first, second = frozen.poll()
    # SIGSTOP: no heartbeat, no poll; its lease runs out and another instance takes the shard.
    clock.advance(LEASE_MS / 1000 + 1)
    wall.advance(LEASE_MS / 1000 + 1)
    taker = _source(kinesis, table, name, "taker")
    taker.heartbeat()
    assert taker.held_shards == [first.shard_id]
    assert _data(taker.poll()) == [b"r1", b"r2"]
    taker.checkpoint(first.shard_id, first.sequence_number, inclusive=False)
    _put(kinesis, name, b"r3")
    # SIGCONT between two batches: the loop polls, then checkpoints what it had.
    assert frozen.poll() == []  # not r3, read under the taker's lease
    assert lost == [first.shard_id]
    frozen.checkpoint(second.shard_id, second.sequence_number, inclusive=False)
    assert _checkpoint_in_table(table, name) == first.sequence_number
    assert _data(taker.poll()) == [b"r3"]
    taker.close()
    frozen.close()


def test_records_read_across_a_freeze_are_dropped_when_the_shard_was_taken_meanwhile(
    stream: tuple[Any, str], table: LeaseTable, wall: _Wall
) -> None:
    kinesis, name = stream
    held = _HeldKinesis(kinesis)
    clock, lost = _Clock(), list[str]()
    frozen = _source(held, table, name, "frozen", clock=clock, on_shard_lost=lost.append)
    _put(kinesis, name, b"r1")
    (first,) = frozen.poll()
    _put(kinesis, name, b"r2")
    held.hold.set()
    returned: list[Record] = []
    polling = threading.Thread(target=lambda: returned.extend(frozen.poll()))
    polling.start()
    try:
        assert held.entered.wait(10)
        # Frozen inside GetRecords until well past its lease; meanwhile the shard is taken.
        clock.advance(LEASE_MS / 1000 + 1)
        wall.advance(LEASE_MS / 1000 + 1)
        taker = _source(kinesis, table, name, "taker")
        taker.heartbeat()
        assert taker.held_shards == [first.shard_id]
    finally:
        held.release.set()
        polling.join(10)
    assert returned == []  # r2 was read, but for a lease no longer ours
    assert frozen.poll() == []
    assert lost == [first.shard_id]
    taker.close()
    frozen.close()


class _ThrottledOnce:
    """A Kinesis client whose next GetRecords, once `armed`, is throttled."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def get_records(self, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            error = {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}}
            raise ClientError(error, "GetRecords")
        return self.client.get_records(**kwargs)


def test_a_throttled_read_resumes_where_the_holding_was_without_replaying(
    stream: tuple[Any, str], table: LeaseTable
) -> None:
    kinesis, name = stream
    throttled = _ThrottledOnce(kinesis)
    source = _source(throttled, table, name, "a", clock=_Clock())
    _put(kinesis, name, b"r1")
    assert _data(source.poll()) == [b"r1"]
    _put(kinesis, name, b"r2")
    throttled.armed = True
    assert source.poll() == []
    assert _data(source.poll()) == [b"r2"]
    source.close()


def test_only_the_owner_writes_a_checkpoint_even_to_a_recreated_lease_item(
    stream: tuple[Any, str], table: LeaseTable
) -> None:
    _, name = stream
    key = f"app/{name}/shardId-000000000000"
    table.create(key, "shardId-000000000000")
    (lease,) = table.scan(f"app/{name}/")
    assert table.take(lease, "a", LEASE_MS)
    stale = table.scan(f"app/{name}/")[0]
    table.client.delete_item(TableName=table.table, Key={"lease_key": {"S": key}})
    table.create(key, "shardId-000000000000")  # same counter as ever, no owner
    (fresh,) = table.scan(f"app/{name}/")
    stale.counter = fresh.counter
    assert not table.set_checkpoint(stale, "1", False)
    assert not table.mark_drained(stale)
    assert not table.release(stale)
    assert table.scan(f"app/{name}/")[0].checkpoint is None


def test_the_lease_client_answers_within_a_lease_or_fails() -> None:
    client = lease_client("us-east-1", 10_000)
    config = client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert config.read_timeout == pytest.approx(10 / 3)
    assert config.connect_timeout <= 2
    assert lease_client("us-east-1", 600_000).meta.config.read_timeout == 5
