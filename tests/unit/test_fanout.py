"""Enhanced fan-out against a scripted Kinesis client: subscriptions, renewals, the fence.

The double answers `subscribe_to_shard` from a per-shard script of event
streams (lists of SubscribeToShardEvent bodies, errors, or `LIVE`: a stream
that stays open without events until it is closed), as boto3's
`{"EventStream": ...}` does. Leases live in an in-memory table with the real
one's conditional semantics; the lease clock is driven by hand.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from callstream.bus import fanout
from callstream.bus.fanout import FanOutReader, FanOutSource, register_consumer
from callstream.bus.leases import Lease
from callstream.bus.reader import Batch, Position, ShardRead
from callstream.clock import now_ms
from callstream.errors import ConfigurationFault

ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/audio/consumer/transcriber:1"
SHARD = "shardId-000000000000"
LIVE = "live"  # a subscription that stays open, without events, until closed


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout, "MIN_SUBSCRIBE_GAP_S", 0.01)
    monkeypatch.setattr(fanout, "RETRY_CAP_S", 0.05)


def _error(code: str, operation: str = "SubscribeToShard") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, operation)


def _event(
    *seqs: int, cont: int | None = None, children: bool = False, behind: int = 0
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "Records": [
            {"SequenceNumber": str(s), "PartitionKey": "call", "Data": f"r{s}".encode()}
            for s in seqs
        ],
        "MillisBehindLatest": behind,
    }
    if cont is not None:
        body["ContinuationSequenceNumber"] = str(cont)
    if children:
        body["ChildShards"] = [{"ShardId": "shardId-000000000001", "ParentShards": [SHARD]}]
    return {"SubscribeToShardEvent": body}


class _EventStream:
    """What boto3's EventStream does for a consumer: iterate events; close."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in self.items:
            if self.closed.is_set():
                return
            if item == LIVE:
                self.closed.wait(30)
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self.closed.set()


class _ScriptedKinesis:
    """SubscribeToShard from per-shard scripts; ListShards from a fixed list."""

    def __init__(self, shards: tuple[str, ...] = (SHARD,)) -> None:
        self.shards = list(shards)
        self.scripts: dict[str, deque[Any]] = {}
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.streams: list[_EventStream] = []
        self.lock = threading.Lock()

    def script(self, shard_id: str, *subscriptions: Any) -> None:
        self.scripts.setdefault(shard_id, deque()).extend(subscriptions)

    def subscribe_to_shard(
        self, *, ConsumerARN: str, ShardId: str, StartingPosition: dict[str, str]
    ) -> dict[str, Any]:
        assert ConsumerARN == ARN
        with self.lock:
            self.calls.append((ShardId, StartingPosition))
            queue = self.scripts.get(ShardId)
            item = queue.popleft() if queue else [LIVE]
        if isinstance(item, Exception):
            raise item
        stream = _EventStream(item)
        self.streams.append(stream)
        return {"EventStream": stream}

    def list_shards(self, **_: Any) -> dict[str, Any]:
        return {"Shards": [{"ShardId": s} for s in self.shards]}


class _MemoryLeases:
    """The lease table's contract in memory: every write conditional on the counter seen."""

    def __init__(self) -> None:
        self.items: dict[str, Lease] = {}

    def scan(self, prefix: str) -> list[Lease]:
        return [copy.copy(v) for k, v in self.items.items() if k.startswith(prefix)]

    def create(self, key: str, shard_id: str) -> None:
        self.items.setdefault(key, Lease(key, shard_id, None, 0, 0, None, False))

    def take(self, lease: Lease, owner: str, duration_ms: int) -> bool:
        return self._write(lease, False, owner=owner, expires_at_ms=now_ms() + duration_ms)

    def release(self, lease: Lease) -> bool:
        return self._write(lease, True, owner=None, expires_at_ms=0)

    def set_checkpoint(
        self, lease: Lease, sequence: str, inclusive: bool, finished: bool = False
    ) -> bool:
        return self._write(
            lease, True, checkpoint=sequence, checkpoint_inclusive=inclusive, finished=finished
        )

    def mark_drained(self, lease: Lease) -> bool:
        return self._write(lease, True, drained=True)

    def _write(self, lease: Lease, held: bool, **changes: Any) -> bool:
        item = self.items[lease.key]
        if item.counter != lease.counter or (held and item.owner != lease.owner):
            return False
        item.__dict__.update(changes, counter=item.counter + 1)
        lease.__dict__.update(copy.copy(item).__dict__)
        return True


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _collect(reader: FanOutReader, reads: list[ShardRead], count: int) -> list[str]:
    """Sequence numbers read until `count` arrived (or 5 s passed)."""
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        for batch in reader.read(reads):
            seen.extend(r.sequence_number for r in batch.records)
    return seen


def _reader(kinesis: _ScriptedKinesis, **kw: Any) -> FanOutReader:
    kw.setdefault("max_wait_s", 0.05)
    return FanOutReader(kinesis, "audio", ARN, **kw)


TRIM = ShardRead(SHARD, 1, Position("TRIM_HORIZON"))


# --- the reader -----------------------------------------------------------------
def test_a_renewed_subscription_resumes_at_the_continuation_without_gap_or_repeat() -> None:
    kinesis = _ScriptedKinesis()
    # The first subscription expires after two events; a server that repeats record 2
    # at the renewal changes nothing.
    kinesis.script(SHARD, [_event(1, cont=1), _event(2, cont=2)], [_event(2, 3, cont=3), LIVE])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _collect(reader, [TRIM], 3) == ["1", "2", "3"]
    assert [position for _, position in kinesis.calls] == [
        {"Type": "TRIM_HORIZON"},
        {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": "2"},
    ]
    reader.close()


def test_a_holding_starts_at_its_checkpoint_and_skips_what_the_server_repeats() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [_event(5, 6, 7, cont=7), LIVE])
    read = ShardRead(SHARD, 1, Position("AFTER_SEQUENCE_NUMBER", "6"))
    reader = _reader(kinesis)
    reader.follow([read])
    assert _collect(reader, [read], 1) == ["7"]
    assert kinesis.calls[0][1] == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": "6"}
    reader.close()


def test_resource_in_use_is_retried_until_the_subscription_is_ours() -> None:
    kinesis = _ScriptedKinesis()
    in_use = _error("ResourceInUseException")
    kinesis.script(SHARD, in_use, in_use, [_event(1, cont=1), LIVE])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _collect(reader, [TRIM], 1) == ["1"]
    assert len(kinesis.calls) == 3
    reader.close()


def test_a_connection_dropped_mid_stream_resubscribes_after_the_last_record() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(
        SHARD, [_event(1, 2, cont=2), ConnectionResetError("peer")], [_event(3, cont=3), LIVE]
    )
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _collect(reader, [TRIM], 3) == ["1", "2", "3"]
    assert kinesis.calls[1][1] == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": "2"}
    reader.close()


def test_access_denied_is_a_configuration_fault_raised_by_the_read() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, _error("AccessDeniedException"))
    reader = _reader(kinesis)
    reader.follow([TRIM])
    with pytest.raises(ConfigurationFault, match="AccessDenied"):
        _collect(reader, [TRIM], 1)
    assert len(kinesis.calls) == 1  # not retried
    reader.close()


def test_child_shards_end_the_shard_and_no_renewal_follows() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [_event(1, cont=1), _event(2, children=True)])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    batches: list[Batch] = []
    deadline = time.monotonic() + 5
    while not (batches and batches[-1].at_end) and time.monotonic() < deadline:
        batches.extend(reader.read([TRIM]))
    assert [r.sequence_number for b in batches for r in b.records] == ["1", "2"]
    time.sleep(0.1)
    assert len(kinesis.calls) == 1
    reader.close()


def test_a_released_shard_stops_its_subscription_and_drops_its_buffer() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [_event(1, cont=1), LIVE])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _wait_for(lambda: bool(kinesis.streams))
    time.sleep(0.05)  # record 1 is buffered
    reader.release(SHARD)
    assert reader.read([TRIM]) == []
    assert _wait_for(lambda: kinesis.streams[0].closed.is_set())
    reader.close()


def test_a_new_holding_replaces_the_old_subscription_and_never_returns_its_records() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [_event(1, cont=1), LIVE], [_event(1, 2, cont=2), LIVE])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _wait_for(lambda: bool(kinesis.streams))
    time.sleep(0.05)
    second = ShardRead(SHARD, 2, Position("AT_SEQUENCE_NUMBER", "1"))
    reader.follow([second])
    assert reader.read([TRIM]) == []  # the old holding's records are gone
    assert _collect(reader, [second], 2) == ["1", "2"]
    assert kinesis.streams[0].closed.is_set()
    reader.close()


def test_rewind_subscribes_again_at_the_record() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [_event(1, 2, 3, cont=3), LIVE], [_event(2, 3, cont=3), LIVE])
    reader = _reader(kinesis)
    reader.follow([TRIM])
    assert _collect(reader, [TRIM], 3) == ["1", "2", "3"]
    reader.rewind(ShardRead(SHARD, 1, Position("AT_SEQUENCE_NUMBER", "2")))
    assert _collect(reader, [TRIM], 2) == ["2", "3"]
    assert kinesis.calls[1][1] == {"Type": "AT_SEQUENCE_NUMBER", "SequenceNumber": "2"}
    reader.close()


def test_the_buffer_is_bounded_and_the_subscription_waits_for_room() -> None:
    kinesis = _ScriptedKinesis()
    kinesis.script(SHARD, [*(_event(s, cont=s) for s in range(1, 11)), LIVE])
    reader = _reader(kinesis, buffer_records=3)
    reader.follow([TRIM])
    assert _wait_for(lambda: reader._subs[SHARD].buffered == 3)
    time.sleep(0.1)
    assert reader._subs[SHARD].buffered == 3  # it waits rather than reading on
    assert _collect(reader, [TRIM], 10) == [str(s) for s in range(1, 11)]
    reader.close()


# --- registration ----------------------------------------------------------------
class _Consumers:
    """Stream consumer calls: absent, then CREATING for `creating` describes, then ACTIVE."""

    def __init__(self, exists: bool = False, creating: int = 2) -> None:
        self.exists = exists
        self.creating = creating
        self.registered = 0

    def describe_stream_summary(self, StreamName: str) -> dict[str, Any]:
        arn = f"arn:aws:kinesis:us-east-1:123456789012:stream/{StreamName}"
        return {"StreamDescriptionSummary": {"StreamARN": arn}}

    def describe_stream_consumer(self, StreamARN: str, ConsumerName: str) -> dict[str, Any]:
        if not self.exists:
            raise _error("ResourceNotFoundException", "DescribeStreamConsumer")
        status = "CREATING" if self.creating > 0 else "ACTIVE"
        self.creating -= 1
        arn = f"{StreamARN}/consumer/{ConsumerName}:1"
        return {"ConsumerDescription": {"ConsumerStatus": status, "ConsumerARN": arn}}

    def register_stream_consumer(self, StreamARN: str, ConsumerName: str) -> None:
        self.registered += 1
        self.exists = True


def test_register_consumer_registers_once_and_waits_until_active() -> None:
    consumers = _Consumers()
    arn = register_consumer(consumers, "audio", "transcriber", sleep=lambda _: None)
    assert arn.endswith("stream/audio/consumer/transcriber:1")
    assert consumers.registered == 1


def test_an_existing_consumer_is_described_not_registered() -> None:
    consumers = _Consumers(exists=True, creating=0)
    register_consumer(consumers, "audio", "transcriber", sleep=lambda _: None)
    assert consumers.registered == 0


def test_a_consumer_never_active_is_a_configuration_fault() -> None:
    consumers = _Consumers(exists=True, creating=10**6)
    ticks = iter(range(1000))
    with pytest.raises(ConfigurationFault, match="not ACTIVE within 3 s"):
        register_consumer(
            consumers,
            "audio",
            "transcriber",
            timeout_s=3,
            sleep=lambda _: None,
            clock=lambda: float(next(ticks)),
        )


# --- the source: leases, the fence, resharding ---------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _source(
    kinesis: _ScriptedKinesis,
    leases: _MemoryLeases,
    clock: _Clock,
    lost: list[str],
    **kw: Any,
) -> FanOutSource:
    return FanOutSource(
        kinesis,
        leases,  # type: ignore[arg-type]
        stream="audio",
        group="transcriber",
        worker_id="a",
        consumer_arn=ARN,
        lease_ms=60_000,
        on_shard_lost=lost.append,
        clock=clock,
        max_wait_s=0.05,
        **kw,
    )


def _poll_until(source: FanOutSource, count: int) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while len(seen) < count and time.monotonic() < deadline:
        seen.extend(r.sequence_number for r in source.poll())
    return seen


def test_the_source_subscribes_from_the_lease_checkpoint_and_checkpoints_what_it_read() -> None:
    kinesis, leases, clock, lost = _ScriptedKinesis(), _MemoryLeases(), _Clock(), list[str]()
    leases.create(f"transcriber/audio/{SHARD}", SHARD)
    leases.items[f"transcriber/audio/{SHARD}"].checkpoint = "4"
    kinesis.script(SHARD, [_event(5, 6, cont=6), LIVE])
    source = _source(kinesis, leases, clock, lost)
    assert _poll_until(source, 2) == ["5", "6"]
    assert kinesis.calls[0][1] == {"Type": "AFTER_SEQUENCE_NUMBER", "SequenceNumber": "4"}
    source.checkpoint(SHARD, "9", inclusive=False)  # never read: ignored
    source.checkpoint(SHARD, "6", inclusive=False)
    assert leases.items[f"transcriber/audio/{SHARD}"].checkpoint == "6"
    source.close()
    assert leases.items[f"transcriber/audio/{SHARD}"].owner is None
    assert _wait_for(lambda: kinesis.streams[0].closed.is_set())


def test_records_pushed_after_the_fence_fell_are_neither_returned_nor_checkpointed() -> None:
    kinesis, leases, clock, lost = _ScriptedKinesis(), _MemoryLeases(), _Clock(), list[str]()
    kinesis.script(SHARD, [_event(1, cont=1), LIVE])
    source = _source(kinesis, leases, clock, lost)
    assert _poll_until(source, 1) == ["1"]
    source.checkpoint(SHARD, "1", inclusive=False)
    clock.now += 55  # no renewal for 90% of the lease: a starved heartbeat or a frozen process
    assert source.poll() == []
    assert lost == [SHARD]
    assert source.held_shards == []
    assert _wait_for(lambda: kinesis.streams[0].closed.is_set())  # its subscription stopped
    source.checkpoint(SHARD, "1", inclusive=True)
    assert leases.items[f"transcriber/audio/{SHARD}"].checkpoint_inclusive is False
    source.close()


def test_a_shard_ended_by_child_shards_is_drained_then_finished_at_its_last_checkpoint() -> None:
    kinesis, leases, clock, lost = _ScriptedKinesis(), _MemoryLeases(), _Clock(), list[str]()
    kinesis.script(SHARD, [_event(1, cont=1), _event(2, children=True)])
    source = _source(kinesis, leases, clock, lost)
    assert _poll_until(source, 2) == ["1", "2"]
    lease = leases.items[f"transcriber/audio/{SHARD}"]
    assert lease.drained and not lease.finished
    source.checkpoint(SHARD, "2", inclusive=False)
    assert lease.finished and lease.checkpoint == "SHARD_END"
    assert len(kinesis.calls) == 1
    source.close()


def test_checkpoints_are_written_at_most_once_per_interval_and_the_last_one_on_close() -> None:
    kinesis, leases, clock, lost = _ScriptedKinesis(), _MemoryLeases(), _Clock(), list[str]()
    kinesis.script(SHARD, [_event(*range(1, 6), cont=5), LIVE])
    source = _source(kinesis, leases, clock, lost, checkpoint_interval_s=1.0)
    assert _poll_until(source, 5) == ["1", "2", "3", "4", "5"]
    lease = leases.items[f"transcriber/audio/{SHARD}"]
    writes = lease.counter
    source.checkpoint(SHARD, "1", inclusive=False)  # the first is written at once
    for seq in ("2", "3"):
        clock.now += 0.3
        source.checkpoint(SHARD, seq, inclusive=False)  # within the second: kept for later
    assert (lease.checkpoint, lease.counter) == ("1", writes + 1)
    clock.now += 0.5
    source.checkpoint(SHARD, "4", inclusive=False)  # a second after the last write
    assert (lease.checkpoint, lease.counter) == ("4", writes + 2)
    source.checkpoint(SHARD, "5", inclusive=False)
    source.close()  # the pending one goes out before the release
    assert (lease.checkpoint, lease.owner) == ("5", None)
