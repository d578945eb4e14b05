"""Every bus adapter passes the one bus contract (`bus_contract.py`).

Adapters: the in-memory twin; Kinesis polling (`KinesisPublisher` +
`KinesisSource`) and Kinesis enhanced fan-out (`FanOutSource`, SubscribeToShard)
against the embedded emulator with its quotas on. A new adapter is one more
factory in `ADAPTERS`. `test_a_source_that_drops_a_record_fails_the_contract`
shows the suite catches a broken adapter.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.config import Config
from bus_contract import CHECKS, BusAdapter, Sink

from callstream.bus.consumer import KinesisSource
from callstream.bus.fanout import FanOutSource, register_consumer
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record, RecordSource

LEASE_MS = 3000
READS = Config(retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=20)


class MemoryBus:
    """The in-memory twin: checkpoints in one dict shared by the group's sources."""

    name = "memory"
    patience_s = 0.2
    quiet_s = 0.05
    at_once_s = 0.2

    def __init__(self) -> None:
        self.stream = MemoryStream(f"contract-{uuid.uuid4().hex[:8]}", shard_count=2)
        self.checkpoints: dict[str, tuple[str, bool]] = {}

    def sink(self) -> Sink:
        return MemoryPublisher(self.stream)

    def source(self) -> RecordSource:
        return MemorySource(self.stream, self.checkpoints)

    def shard_ids(self) -> set[str]:
        return {f"shardId-{i:012d}" for i in range(self.stream.shard_count)}


class KinesisBus:
    """A 2-shard stream on the emulator; sources of one group share a lease table."""

    name = "kinesis-polling"
    patience_s = 8.0
    quiet_s = 0.6  # three polling intervals
    at_once_s = LEASE_MS / 1000 - 0.5  # released, not waited out

    def __init__(self, session: Any) -> None:
        self.kinesis = session.client("kinesis")
        self.reads = session.client("kinesis", config=READS)
        self.leases = LeaseTable(session.client("dynamodb"), f"contract-{uuid.uuid4().hex[:8]}")
        self.leases.ensure_table()
        self.stream = f"contract-{uuid.uuid4().hex[:8]}"
        self.kinesis.create_stream(StreamName=self.stream, ShardCount=2)
        self.kinesis.get_waiter("stream_exists").wait(
            StreamName=self.stream, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
        )
        self.sources: list[KinesisSource] = []

    def sink(self) -> Sink:
        return KinesisPublisher(self.kinesis, self.stream)

    def source(self) -> RecordSource:
        source = self._make(f"worker-{len(self.sources)}")
        self.sources.append(source)
        return source

    def _make(self, worker: str) -> KinesisSource:
        return KinesisSource(
            self.reads, self.leases, stream=self.stream, group="contract", worker_id=worker,
            lease_ms=LEASE_MS,
        )  # fmt: skip

    def shard_ids(self) -> set[str]:
        shards = self.kinesis.list_shards(StreamName=self.stream)["Shards"]
        return {shard["ShardId"] for shard in shards}

    def close(self) -> None:
        for source in self.sources:
            source.close()  # idempotent: most were closed by the check itself


class FanOutBus(KinesisBus):
    """The same stream read with enhanced fan-out (the group's registered consumer)."""

    name = "kinesis-fanout"

    def __init__(self, session: Any) -> None:
        super().__init__(session)
        self.consumer_arn = register_consumer(self.kinesis, self.stream, "contract")

    def _make(self, worker: str) -> KinesisSource:
        return FanOutSource(
            self.reads, self.leases, stream=self.stream, group="contract", worker_id=worker,
            consumer_arn=self.consumer_arn, lease_ms=LEASE_MS,
        )  # fmt: skip


def _memory(request: pytest.FixtureRequest) -> MemoryBus:
    return MemoryBus()


def _kinesis(request: pytest.FixtureRequest) -> KinesisBus:
    return KinesisBus(request.getfixturevalue("aws_session"))


def _fanout(request: pytest.FixtureRequest) -> KinesisBus:
    return FanOutBus(request.getfixturevalue("aws_session"))


ADAPTERS: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "memory": _memory,
    "kinesis-polling": _kinesis,
    "kinesis-fanout": _fanout,
}


@pytest.fixture(
    params=[
        "memory",
        pytest.param("kinesis-polling", marks=pytest.mark.integration),
        pytest.param("kinesis-fanout", marks=pytest.mark.integration),
    ]
)
def adapter(request: pytest.FixtureRequest) -> Iterator[BusAdapter]:
    made = ADAPTERS[request.param](request)
    yield made
    if hasattr(made, "close"):
        made.close()


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_bus_adapter_keeps_the_port_contract(
    adapter: BusAdapter, check: Callable[[BusAdapter], None]
) -> None:
    check(adapter)


# --- the suite itself catches a broken adapter ------------------------------------------


class _DropsLastRecord:
    """A source that loses the last record of every non-empty poll."""

    def __init__(self, inner: RecordSource) -> None:
        self._inner = inner
        self.stream = inner.stream

    def poll(self) -> list[Record]:
        return self._inner.poll()[:-1]

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        self._inner.checkpoint(shard_id, sequence_number, inclusive=inclusive)

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        self._inner.rewind(shard_id, sequence_number)

    def close(self) -> None:
        self._inner.close()


class _BrokenMemoryBus(MemoryBus):
    name = "memory, last record dropped"

    def source(self) -> RecordSource:
        return _DropsLastRecord(super().source())


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_a_source_that_drops_a_record_fails_the_contract(
    check: Callable[[BusAdapter], None],
) -> None:
    with pytest.raises(AssertionError):
        check(_BrokenMemoryBus())
