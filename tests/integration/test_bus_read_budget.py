"""Polling within a shard's shared read budget: pacing, throttle backoff, iterator expiry.

`PollingReader` against a scripted Kinesis client and a virtual clock (its
`sleep` moves the clock), so the pacing is checked to the millisecond.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from callstream.bus.polling import (
    MIN_READ_INTERVAL_S,
    READ_THROTTLES,
    PollingReader,
    read_interval_s,
)
from callstream.bus.reader import Position, ShardRead
from callstream.metrics import Metrics

SHARD = "shardId-000000000000"
READ = ShardRead(SHARD, 1, Position("TRIM_HORIZON"))


class _Time:
    """A clock that only `sleep` moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Kinesis:
    """GetRecords answering from a script of responses or error codes; calls time-stamped."""

    def __init__(self, time: _Time, script: list[Any] | None = None) -> None:
        self.time = time
        self.script = list(script or [])
        self.reads: list[float] = []
        self.iterators: list[dict[str, Any]] = []

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, str]:
        self.iterators.append(kwargs)
        return {"ShardIterator": f"it-{len(self.iterators)}"}

    def get_records(self, *, ShardIterator: str, Limit: int) -> dict[str, Any]:
        self.reads.append(self.time.now)
        item = self.script.pop(0) if self.script else {}
        if isinstance(item, str):
            raise ClientError({"Error": {"Code": item, "Message": item}}, "GetRecords")
        return {"Records": [], "NextShardIterator": "next", "MillisBehindLatest": 0, **item}


def _records(*seqs: int) -> dict[str, Any]:
    return {
        "Records": [{"SequenceNumber": str(s), "PartitionKey": "k", "Data": b"x"} for s in seqs]
    }


def _reader(kinesis: _Kinesis, time: _Time, **kw: Any) -> PollingReader:
    reader = PollingReader(kinesis, "audio", clock=time.clock, sleep=time.sleep, **kw)
    reader.follow([READ])
    return reader


@pytest.mark.parametrize(("groups", "interval"), [(1, 0.2), (2, 0.4), (3, 0.6), (4, 0.8)])
def test_the_interval_is_the_groups_share_of_five_reads_per_second(
    groups: int, interval: float
) -> None:
    assert read_interval_s(groups) == pytest.approx(interval)


def test_the_interval_never_goes_under_a_fifth_of_a_second() -> None:
    assert read_interval_s(1, floor_s=0.01) == MIN_READ_INTERVAL_S
    assert read_interval_s(0) == MIN_READ_INTERVAL_S
    assert read_interval_s(2, floor_s=1.0) == 1.0
    assert PollingReader(None, "s", interval_s=0.05).interval_s == MIN_READ_INTERVAL_S


def test_a_shard_is_read_at_most_once_per_interval_however_often_it_is_polled() -> None:
    time = _Time()
    kinesis = _Kinesis(time)
    reader = _reader(kinesis, time, interval_s=read_interval_s(2))
    for _ in range(50):  # a busy loop: every read returns records at once
        reader.read([READ])
    gaps = [b - a for a, b in zip(kinesis.reads, kinesis.reads[1:], strict=False)]
    assert min(gaps) >= 0.4 - 1e-9
    assert len(kinesis.reads) / (kinesis.reads[-1] - kinesis.reads[0] + 0.4) <= 2.5


def test_throttles_back_off_exponentially_with_jitter_and_success_resets_them() -> None:
    time, metrics = _Time(), Metrics("test", "off")
    throttled = "ProvisionedThroughputExceededException"
    kinesis = _Kinesis(time, [throttled, throttled, throttled, {}, throttled])
    reader = _reader(kinesis, time, interval_s=0.2, max_wait_s=10, metrics=metrics)
    for _ in range(5):
        reader.read([READ])
    gaps = [b - a for a, b in zip(kinesis.reads, kinesis.reads[1:], strict=False)]
    assert 0.2 <= gaps[0] < 0.4  # after the first throttle: 1-2 intervals
    assert 0.4 <= gaps[1] < 0.8
    assert 0.8 <= gaps[2] < 1.6
    assert gaps[3] == pytest.approx(0.2)  # the success reset the backoff
    assert metrics.value(READ_THROTTLES, shard=SHARD) == 4


def test_a_long_backoff_returns_to_the_loop_instead_of_sleeping_it_out() -> None:
    time = _Time()
    kinesis = _Kinesis(time, ["ProvisionedThroughputExceededException"] * 6)
    reader = _reader(kinesis, time, interval_s=0.2, max_wait_s=0.5)
    while len(kinesis.reads) < 6:  # a read() may return early: count the throttles served
        reader.read([READ])
    started = time.now
    assert reader.read([READ]) == []  # the next read is seconds away
    assert time.now - started == pytest.approx(0.5)


def test_a_throttled_read_keeps_its_iterator() -> None:
    time = _Time()
    kinesis = _Kinesis(time, [_records(1), "ProvisionedThroughputExceededException", _records(2)])
    reader = _reader(kinesis, time)
    got = [r.sequence_number for _ in range(3) for b in reader.read([READ]) for r in b.records]
    assert got == ["1", "2"]
    assert len(kinesis.iterators) == 1


def test_an_expired_iterator_resumes_after_the_last_record_of_the_holding() -> None:
    time = _Time()
    kinesis = _Kinesis(time, [_records(7, 8), "ExpiredIteratorException", _records(9)])
    reader = _reader(kinesis, time)
    for _ in range(3):
        reader.read([READ])
    assert kinesis.iterators[1] == {
        "StreamName": "audio",
        "ShardId": SHARD,
        "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
        "StartingSequenceNumber": "8",
    }


def test_a_closed_shard_read_to_its_end_is_reported_at_end() -> None:
    time = _Time()
    kinesis = _Kinesis(time, [{**_records(1), "NextShardIterator": None, "ChildShards": []}])
    (batch,) = _reader(kinesis, time).read([READ])
    assert batch.at_end and [r.sequence_number for r in batch.records] == ["1"]


def test_a_new_holding_starts_at_its_own_position_but_keeps_the_shards_pace() -> None:
    time = _Time()
    kinesis = _Kinesis(time)
    reader = _reader(kinesis, time, interval_s=0.4)
    reader.read([READ])
    again = ShardRead(SHARD, 2, Position("AT_SEQUENCE_NUMBER", "5"))
    reader.follow([again])
    reader.read([again])
    assert kinesis.reads[1] - kinesis.reads[0] == pytest.approx(0.4)
    assert kinesis.iterators[1]["StartingSequenceNumber"] == "5"
