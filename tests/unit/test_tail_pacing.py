"""`StreamTail` stays within a shard's shared read budget: paced reads, throttle backoff.

A scripted Kinesis client on a virtual clock (its `sleep` moves the clock), so
the reads' times are checked to the millisecond.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from botocore.exceptions import ClientError

from callstream.bus.polling import read_interval_s
from callstream.bus.tail import TAIL_GROUPS, StreamTail
from callstream.contract import default_contract
from callstream.errors import PoisonRecordError
from callstream.events import CallEnded, EndReason

STREAM = "callstream-transcripts"


class _Time:
    """A clock that only `sleep` moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class _Kinesis:
    """Shards answering GetRecords from a script (responses or error codes); reads time-stamped."""

    def __init__(self, time: _Time, scripts: dict[str, list[Any]]) -> None:
        self.time = time
        self.scripts = {shard: list(script) for shard, script in scripts.items()}
        self.reads: list[tuple[str, float]] = []
        self.iterator_kinds: list[str] = []

    def list_shards(self, *, StreamName: str) -> dict[str, Any]:
        return {"Shards": [{"ShardId": shard} for shard in self.scripts]}

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, str]:
        self.iterator_kinds.append(kwargs["ShardIteratorType"])
        return {"ShardIterator": kwargs["ShardId"]}

    def get_records(self, *, ShardIterator: str, Limit: int) -> dict[str, Any]:
        shard = ShardIterator
        self.reads.append((shard, round(self.time.now, 3)))
        script = self.scripts[shard]
        item = script.pop(0) if script else {}
        if isinstance(item, str):
            raise ClientError({"Error": {"Code": item, "Message": item}}, "GetRecords")
        return {"Records": [], "NextShardIterator": shard, "MillisBehindLatest": 0, **item}


def _ended(contact: str) -> bytes:
    return default_contract().encode(
        CallEnded(contact_id=contact, reason=EndReason.END_OF_STREAM, ended_at_ms=0)
    )


def _records(*contacts: str, start: int = 0) -> dict[str, Any]:
    return {
        "Records": [
            {"SequenceNumber": f"{start + i:03d}", "PartitionKey": c, "Data": _ended(c)}
            for i, c in enumerate(contacts)
        ]
    }


def _tail(kinesis: _Kinesis, time: _Time, **kwargs: Any) -> StreamTail:
    return StreamTail(kinesis, STREAM, clock=time.clock, sleep=time.sleep, **kwargs)


def test_each_shard_is_read_at_most_once_per_interval_however_often_it_is_polled() -> None:
    time = _Time()
    kinesis = _Kinesis(time, {"a": [], "b": []})
    tail = _tail(kinesis, time)
    for _ in range(5):
        tail.poll()
    interval = read_interval_s(TAIL_GROUPS)
    assert interval == pytest.approx(0.6)
    for shard in ("a", "b"):
        times = [t for s, t in kinesis.reads if s == shard]
        assert times == pytest.approx([100.0 + i * interval for i in range(5)])
    assert kinesis.iterator_kinds == ["TRIM_HORIZON", "TRIM_HORIZON"]  # one iterator per shard


def test_the_interval_is_sized_for_the_groups_sharing_the_shard() -> None:
    time = _Time()
    kinesis = _Kinesis(time, {"a": []})
    tail = _tail(kinesis, time, groups=5)
    tail.poll()
    tail.poll()
    assert [t for _, t in kinesis.reads] == pytest.approx([100.0, 101.0])  # 5 groups: 1 s


def test_a_poll_returns_every_shards_records_in_order_and_poison_as_errors() -> None:
    time = _Time()
    kinesis = _Kinesis(
        time,
        {
            "a": [_records("c1", "c2"), _records("c5", start=2)],
            "b": [{"Records": [{"SequenceNumber": "0", "PartitionKey": "x", "Data": b"junk"}]}],
        },
    )
    tail = _tail(kinesis, time)
    first = tail.poll()
    assert [e.contact_id for e in first if isinstance(e, CallEnded)] == ["c1", "c2"]
    assert len([e for e in first if isinstance(e, PoisonRecordError)]) == 1
    assert [e.contact_id for e in tail.poll() if isinstance(e, CallEnded)] == ["c5"]


def test_a_throttled_shard_backs_off_exponentially_and_is_read_in_the_same_poll() -> None:
    time = _Time()
    throttled = "ProvisionedThroughputExceededException"
    kinesis = _Kinesis(time, {"a": [throttled, throttled, _records("c1")], "b": []})
    tail = _tail(kinesis, time)
    events = tail.poll()
    assert [e.contact_id for e in events if isinstance(e, CallEnded)] == ["c1"]
    reads_a = [t for s, t in kinesis.reads if s == "a"]
    assert len(reads_a) == 3
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads_a)]
    interval = read_interval_s(TAIL_GROUPS)
    assert interval <= gaps[0] < 2 * interval  # first throttle: interval x [1, 2)
    assert 2 * interval <= gaps[1] < 4 * interval  # second: doubled
    assert [s for s, _ in kinesis.reads].count("b") == 1  # the other shard is not re-read
    # Success resets the backoff: the next read comes one interval later.
    tail.poll()
    assert [t for s, t in kinesis.reads if s == "a"][-1] == pytest.approx(reads_a[-1] + interval)


def test_a_shard_throttled_past_the_patience_is_left_for_the_next_poll() -> None:
    time = _Time()
    throttled = "ProvisionedThroughputExceededException"
    kinesis = _Kinesis(time, {"a": [throttled] * 6 + [_records("late")], "b": [_records("c1")]})
    tail = _tail(kinesis, time, patience_s=1.0)
    started = time.now
    events = tail.poll()
    assert time.now - started <= read_interval_s(TAIL_GROUPS) + 1.0 + 5.0  # bounded
    assert [e.contact_id for e in events if isinstance(e, CallEnded)] == ["c1"]
    late: list[Any] = []
    for _ in range(60):  # backoffs of up to 5 s: a few polls per attempt
        late += tail.poll()
    assert [e.contact_id for e in late if isinstance(e, CallEnded)] == ["late"]
    assert kinesis.iterator_kinds.count("TRIM_HORIZON") == 2  # resumed, not restarted


def test_a_closed_shard_read_to_its_end_is_not_read_again() -> None:
    time = _Time()
    kinesis = _Kinesis(time, {"a": [{**_records("c1"), "NextShardIterator": None}], "b": []})
    tail = _tail(kinesis, time)
    tail.poll()
    tail.poll()
    assert [s for s, _ in kinesis.reads].count("a") == 1


def test_latest_starts_every_shard_at_its_tip() -> None:
    time = _Time()
    kinesis = _Kinesis(time, {"a": []})
    _tail(kinesis, time, latest=True).poll()
    assert kinesis.iterator_kinds == ["LATEST"]
