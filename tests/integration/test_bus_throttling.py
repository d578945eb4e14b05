"""The emulator's DynamoDB and S3 throttling faults, through boto3, and what our adapters do.

Faults answer a seeded share of requests as AWS does under load:
ProvisionedThroughputExceededException, BatchWriteItem UnprocessedItems, S3
503 SlowDown. The persister's batch writer retries unprocessed rows until
every one is stored.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from callstream.aws import ensure_table
from callstream_emulator.emulator import Emulator
from callstream_emulator.faults import remote_faults

pytestmark = pytest.mark.integration
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def _table(dynamodb: Any) -> str:
    name = f"throttle-{uuid.uuid4().hex[:8]}"
    ensure_table(dynamodb, name, ("ContactId", "S"), ("StartTime", "N"))
    return name


def _puts(n: int) -> list[dict[str, Any]]:
    return [
        {"PutRequest": {"Item": {"ContactId": {"S": "c"}, "StartTime": {"N": str(i)}}}}
        for i in range(n)
    ]


def test_batch_write_leaves_a_seeded_share_unprocessed(
    emulator: Emulator, aws_session: Any
) -> None:
    dynamodb = aws_session.client("dynamodb", config=NO_RETRIES)
    table = _table(dynamodb)
    emulator.faults.throttle_dynamodb(0.5, seed=3, operations=["BatchWriteItem"])
    first = dynamodb.batch_write_item(RequestItems={table: _puts(25)})
    left = first["UnprocessedItems"].get(table, [])
    assert 0 < len(left) < 25
    stored = dynamodb.scan(TableName=table)["Items"]
    assert len(stored) == 25 - len(left)
    emulator.faults.throttle_dynamodb(0.5, seed=3, operations=["BatchWriteItem"])
    again = dynamodb.batch_write_item(RequestItems={f"{table}": _puts(25)})
    assert len(again["UnprocessedItems"].get(table, [])) == len(left)  # seeded: repeatable


def test_dynamodb_requests_are_refused_with_throughput_exceeded(
    emulator: Emulator, aws_session: Any
) -> None:
    dynamodb = aws_session.client("dynamodb", config=NO_RETRIES)
    table = _table(dynamodb)
    emulator.faults.throttle_dynamodb(1.0, operations=["PutItem"])
    with pytest.raises(ClientError) as caught:
        dynamodb.put_item(TableName=table, Item={"ContactId": {"S": "c"}, "StartTime": {"N": "1"}})
    assert caught.value.response["Error"]["Code"] == "ProvisionedThroughputExceededException"


def test_s3_puts_are_refused_with_slow_down(emulator: Emulator, aws_session: Any) -> None:
    s3 = aws_session.client("s3", config=NO_RETRIES)
    bucket = f"throttle-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    emulator.faults.throttle_s3(1.0, operations=["PutObject"])
    with pytest.raises(ClientError) as caught:
        s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert caught.value.response["Error"]["Code"] == "SlowDown"
    emulator.faults.clear()
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")


def test_dynamodb_and_s3_faults_are_settable_over_http(
    emulator: Emulator, aws_env: dict[str, str]
) -> None:
    snapshot = remote_faults(
        emulator.control_url,
        {
            "clear": True,
            "dynamodb_throttle": {"share": 0.25, "seed": 1, "partial_batch_writes": True},
            "s3_throttle": {"share": 0.1, "operations": ["PutObject"]},
        },
    )
    assert snapshot["dynamodb_throttle"]["share"] == 0.25
    assert snapshot["s3_throttle"]["operations"] == ["PutObject"]
    assert remote_faults(emulator.control_url, {"clear": True})["s3_throttle"]["share"] == 0.0


def test_the_persister_stores_every_row_through_unprocessed_items(
    emulator: Emulator, aws_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from callstream.events import Track, TranscriptSegmentProduced
    from services.persister.handler import PersisterHandler
    from services.persister.settings import PersisterSettings

    dynamodb = aws_session.client("dynamodb")
    customer, agent = _table(dynamodb), _table(dynamodb)
    monkeypatch.setenv("TABLE_CALLER_TRANSCRIPT", customer)
    monkeypatch.setenv("TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER", agent)
    handler = PersisterHandler(PersisterSettings.from_env(), aws_session.resource("dynamodb"))
    emulator.faults.throttle_dynamodb(0.6, seed=9, operations=["BatchWriteItem"])
    for i in range(120):
        track = Track.FROM_CUSTOMER if i % 2 else Track.TO_CUSTOMER
        segment = TranscriptSegmentProduced(
            "c", track, f"c:{track.value}:{i * 1000}", i * 1000, i * 1000 + 900, f"words {i}", False
        )
        handler.handle(segment, None)  # type: ignore[arg-type]
    assert not handler.is_settled("c")
    handler.flush()
    assert handler.is_settled("c")
    emulator.faults.clear()
    stored = [dynamodb.scan(TableName=t)["Items"] for t in (customer, agent)]
    assert [len(items) for items in stored] == [60, 60]
