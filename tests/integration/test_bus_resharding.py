"""The emulator's Kinesis resharding, through boto3: it must behave as AWS does.

A closed parent keeps its records and takes no more writes; keys route to
the open children; reading a closed shard to its end yields `ChildShards`
and no `NextShardIterator`.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _stream(aws_session: Any, shards: int = 1) -> tuple[Any, str]:
    kinesis = aws_session.client("kinesis")
    name = f"reshard-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return kinesis, name


def _read_to_end(kinesis: Any, name: str, shard_id: str) -> tuple[list[bytes], dict[str, Any]]:
    iterator = kinesis.get_shard_iterator(
        StreamName=name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    data: list[bytes] = []
    for _ in range(100):
        response = kinesis.get_records(ShardIterator=iterator, Limit=2)
        data.extend(r["Data"] for r in response["Records"])
        if response.get("NextShardIterator") is None:
            return data, response
        iterator = response["NextShardIterator"]
    raise AssertionError(f"{shard_id} never ended")


def _shards(kinesis: Any, name: str) -> dict[str, dict[str, Any]]:
    return {s["ShardId"]: s for s in kinesis.list_shards(StreamName=name)["Shards"]}


def test_a_split_parent_keeps_its_records_and_ends_with_its_children(aws_session: Any) -> None:
    kinesis, name = _stream(aws_session)
    for i in range(3):
        kinesis.put_record(StreamName=name, Data=f"before-{i}".encode(), PartitionKey=f"k{i}")
    parent = next(iter(_shards(kinesis, name)))
    kinesis.split_shard(StreamName=name, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    shards = _shards(kinesis, name)
    children = sorted(s for s in shards if s != parent)
    assert len(children) == 2
    assert all(shards[c]["ParentShardId"] == parent for c in children)
    assert "EndingSequenceNumber" in shards[parent]["SequenceNumberRange"]

    data, last = _read_to_end(kinesis, name, parent)
    assert data == [b"before-0", b"before-1", b"before-2"]
    assert sorted(c["ShardId"] for c in last["ChildShards"]) == children
    assert all(c["ParentShards"] == [parent] for c in last["ChildShards"])


def test_writes_after_a_split_go_to_the_open_child_that_owns_the_key(aws_session: Any) -> None:
    kinesis, name = _stream(aws_session)
    parent = next(iter(_shards(kinesis, name)))
    kinesis.split_shard(StreamName=name, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    low = kinesis.put_record(StreamName=name, Data=b"low", PartitionKey="x", ExplicitHashKey="5")
    high = kinesis.put_record(
        StreamName=name, Data=b"high", PartitionKey="x", ExplicitHashKey=str(2**127)
    )
    keyed = [
        kinesis.put_record(StreamName=name, Data=b"k", PartitionKey=f"contact-{i}")["ShardId"]
        for i in range(20)
    ]
    assert low["ShardId"] != high["ShardId"]
    assert parent not in {low["ShardId"], high["ShardId"], *keyed}
    assert _read_to_end(kinesis, name, parent)[0] == []


def test_a_merge_closes_both_parents_and_routes_to_the_child(aws_session: Any) -> None:
    kinesis, name = _stream(aws_session, shards=2)
    first, second = sorted(_shards(kinesis, name))
    kinesis.put_record(StreamName=name, Data=b"old", PartitionKey="p", ExplicitHashKey="1")
    kinesis.merge_shards(StreamName=name, ShardToMerge=first, AdjacentShardToMerge=second)
    (child,) = [s for s in _shards(kinesis, name) if s not in (first, second)]
    put = kinesis.put_record(StreamName=name, Data=b"new", PartitionKey="p", ExplicitHashKey="1")
    assert put["ShardId"] == child
    data, last = _read_to_end(kinesis, name, first)
    assert data == [b"old"]
    assert last["ChildShards"][0]["ShardId"] == child
    assert sorted(last["ChildShards"][0]["ParentShards"]) == [first, second]


def test_update_shard_count_doubles_into_open_children(aws_session: Any) -> None:
    kinesis, name = _stream(aws_session, shards=2)
    kinesis.update_shard_count(StreamName=name, TargetShardCount=4, ScalingType="UNIFORM_SCALING")
    shards = _shards(kinesis, name)
    open_shards = [
        s for s, v in shards.items() if "EndingSequenceNumber" not in v["SequenceNumberRange"]
    ]
    assert len(open_shards) == 4
    used = {
        kinesis.put_record(StreamName=name, Data=b"x", PartitionKey=f"c{i}")["ShardId"]
        for i in range(64)
    }
    assert used <= set(open_shards) and len(used) == 4
