"""Dead letters: listed with filters, redriven to their source stream once, through boto3."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.deadletters import list_dead_letters, redrive
from callstream.events import DeadLetter

pytestmark = pytest.mark.integration


def _stream(kinesis: Any) -> str:
    name = f"dl-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return name


def _letter(service: str, source: str, sequence: str, reason: str, data: bytes) -> DeadLetter:
    return DeadLetter(
        service=service,
        source_stream=source,
        shard_id="shardId-000000000000",
        sequence_number=sequence,
        partition_key=f"key-{sequence}",
        reason=reason,
        error_type="PoisonRecordError",
        failed_at_ms=0,
        data=data,
    )


def _all_data(kinesis: Any, stream: str) -> list[bytes]:
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    return [r["Data"] for r in kinesis.get_records(ShardIterator=iterator)["Records"]]


@pytest.fixture
def letters(aws_session: Any) -> dict[str, Any]:
    kinesis = aws_session.client("kinesis")
    dead, audio = _stream(kinesis), _stream(kinesis)
    KinesisPublisher(kinesis, dead).publish(
        [
            _letter("transcriber", audio, "7", "not an Avro single-object record", b"bad-7"),
            _letter("recorder", audio, "7", "not an Avro single-object record", b"bad-7"),
            _letter("recorder", audio, "9", "ValueError: handler bug", b"bad-9"),
        ]
    )
    kinesis.put_record(StreamName=dead, Data=b"garbage", PartitionKey="x")
    table = LeaseTable(aws_session.client("dynamodb"), f"ledger-{uuid.uuid4().hex[:8]}")
    table.ensure_table()
    return {"kinesis": kinesis, "dead": dead, "audio": audio, "ledger": table.table}


def test_dead_letters_are_listed_with_their_origin_and_filtered(letters: dict[str, Any]) -> None:
    kinesis, dead = letters["kinesis"], letters["dead"]
    every = list_dead_letters(kinesis, dead)
    assert [(e.letter.service, e.letter.sequence_number) for e in every] == [
        ("transcriber", "7"),
        ("recorder", "7"),
        ("recorder", "9"),
    ]
    assert every[0].original == f"{letters['audio']}/shardId-000000000000/7"
    assert len(list_dead_letters(kinesis, dead, service="recorder")) == 2
    assert [e.letter.data for e in list_dead_letters(kinesis, dead, reason="handler")] == [b"bad-9"]


def test_redrive_puts_each_original_back_once_across_runs(
    letters: dict[str, Any], aws_session: Any
) -> None:
    kinesis, dynamodb = letters["kinesis"], aws_session.client("dynamodb")
    options = {"deadletter_stream": letters["dead"], "ledger_table": letters["ledger"]}
    dry = redrive(kinesis, dynamodb, dry_run=True, **options)
    assert len(dry.redriven) == 2 and _all_data(kinesis, letters["audio"]) == []
    first = redrive(kinesis, dynamodb, reason="avro", **options)
    assert len(first.redriven) == 1 and len(first.already_redriven) == 1  # same original twice
    assert first.unreadable == 1
    second = redrive(kinesis, dynamodb, **options)
    assert len(second.redriven) == 1  # only the one not redriven before
    third = redrive(kinesis, dynamodb, **options)
    assert third.redriven == []
    assert sorted(_all_data(kinesis, letters["audio"])) == [b"bad-7", b"bad-9"]
