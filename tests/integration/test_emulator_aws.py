"""The emulator's moto side through real boto3: KDS, DynamoDB, S3, faults, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from callstream_emulator.emulator import CLEARED_ENV, Emulator
from callstream_emulator.faults import remote_faults

pytestmark = pytest.mark.integration

NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})
REPO = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def kinesis_stream(aws_session: Any) -> tuple[Any, str]:
    kinesis = aws_session.client("kinesis", config=NO_RETRIES)
    name = unique("events")
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return kinesis, name


def shard_iterator(kinesis: Any, name: str) -> str:
    shard = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    return str(
        kinesis.get_shard_iterator(
            StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
    )


def test_emulator_starts_within_three_seconds(emulator: Emulator) -> None:
    assert emulator.start_seconds < 3.0


def test_env_points_boto3_at_the_emulator(emulator: Emulator, aws_env: dict[str, str]) -> None:
    assert aws_env["AWS_ENDPOINT_URL"] == emulator.endpoint_url
    assert aws_env["APP_REGION"] == aws_env["AWS_DEFAULT_REGION"] == emulator.region
    assert aws_env["AWS_ACCESS_KEY_ID"] == aws_env["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert not set(CLEARED_ENV) & set(os.environ)


def test_kinesis_records_round_trip(kinesis_stream: tuple[Any, str]) -> None:
    kinesis, name = kinesis_stream
    kinesis.put_record(StreamName=name, Data=b"first", PartitionKey="contact-1")
    batch = [{"Data": f"r{i}".encode(), "PartitionKey": "contact-1"} for i in range(3)]
    assert kinesis.put_records(StreamName=name, Records=batch)["FailedRecordCount"] == 0
    records = kinesis.get_records(ShardIterator=shard_iterator(kinesis, name))["Records"]
    assert [r["Data"] for r in records] == [b"first", b"r0", b"r1", b"r2"]


def test_dynamodb_items_round_trip(aws_session: Any) -> None:
    dynamodb = aws_session.client("dynamodb")
    table = unique("transcripts")
    dynamodb.create_table(
        TableName=table,
        KeySchema=[
            {"AttributeName": "ContactId", "KeyType": "HASH"},
            {"AttributeName": "StartTime", "KeyType": "RANGE"},
        ],
        AttributeDefinitions=[
            {"AttributeName": "ContactId", "AttributeType": "S"},
            {"AttributeName": "StartTime", "AttributeType": "N"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    item = {"ContactId": {"S": "c-1"}, "StartTime": {"N": "1.5"}, "Transcript": {"S": "hello"}}
    dynamodb.put_item(TableName=table, Item=item)
    key = {"ContactId": {"S": "c-1"}, "StartTime": {"N": "1.5"}}
    assert dynamodb.get_item(TableName=table, Key=key)["Item"] == item


def test_s3_objects_round_trip(aws_session: Any) -> None:
    s3 = aws_session.client("s3")
    bucket = unique("recordings")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="recordings/c-1.wav", Body=b"RIFF....WAVE")
    body = s3.get_object(Bucket=bucket, Key="recordings/c-1.wav")["Body"].read()
    assert body == b"RIFF....WAVE"


@pytest.mark.parametrize("operation", ["PutRecord", "PutRecords", "GetRecords"])
def test_throttling_fault_raises_provisioned_throughput_exceeded(
    emulator: Emulator, kinesis_stream: tuple[Any, str], operation: str
) -> None:
    kinesis, name = kinesis_stream
    iterator = shard_iterator(kinesis, name)
    emulator.faults.throttle_kinesis(1.0, operations=[operation])
    calls = {
        "PutRecord": lambda: kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k"),
        "PutRecords": lambda: kinesis.put_records(
            StreamName=name, Records=[{"Data": b"x", "PartitionKey": "k"}]
        ),
        "GetRecords": lambda: kinesis.get_records(ShardIterator=iterator),
    }
    with pytest.raises(ClientError) as raised:
        calls[operation]()
    assert raised.value.response["Error"]["Code"] == "ProvisionedThroughputExceededException"


def test_throttling_share_is_repeatable_with_a_seed(
    emulator: Emulator, kinesis_stream: tuple[Any, str]
) -> None:
    kinesis, name = kinesis_stream

    def outcomes() -> list[bool]:
        emulator.faults.throttle_kinesis(0.5, seed=42, operations=["PutRecord"])
        results = []
        for _ in range(20):
            try:
                kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
                results.append(True)
            except ClientError:
                results.append(False)
        return results

    first = outcomes()
    assert first == outcomes()
    assert 0 < first.count(False) < 20


def test_partial_put_records_fails_single_entries(
    emulator: Emulator, kinesis_stream: tuple[Any, str]
) -> None:
    kinesis, name = kinesis_stream
    emulator.faults.throttle_kinesis(0.5, seed=3, partial_put_records=True)
    batch = [{"Data": f"r{i}".encode(), "PartitionKey": "k"} for i in range(20)]
    answer = kinesis.put_records(StreamName=name, Records=batch)
    failed = [r for r in answer["Records"] if "ErrorCode" in r]
    assert 0 < answer["FailedRecordCount"] == len(failed) < 20
    assert {r["ErrorCode"] for r in failed} == {"ProvisionedThroughputExceededException"}
    emulator.faults.clear()
    stored = kinesis.get_records(ShardIterator=shard_iterator(kinesis, name))["Records"]
    kept = [batch[i]["Data"] for i, r in enumerate(answer["Records"]) if "SequenceNumber" in r]
    assert [r["Data"] for r in stored] == kept


def test_faults_are_off_by_default_and_settable_over_http(
    emulator: Emulator, aws_env: dict[str, str], kinesis_stream: tuple[Any, str]
) -> None:
    kinesis, name = kinesis_stream
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    control = aws_env["CALLSTREAM_EMULATOR_CONTROL_URL"]
    state = remote_faults(control, {"kinesis_throttle": {"share": 1.0}})
    assert state["kinesis_throttle"]["share"] == 1.0
    with pytest.raises(ClientError):
        kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    remote_faults(control, {"clear": True})
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")


def test_bad_fault_settings_are_refused(aws_env: dict[str, str]) -> None:
    from urllib.error import HTTPError

    with pytest.raises(HTTPError) as raised:
        remote_faults(aws_env["CALLSTREAM_EMULATOR_CONTROL_URL"], {"throttle_everything": 1})
    assert raised.value.code == 400


def test_a_second_emulator_in_one_process_is_refused(emulator: Emulator) -> None:
    with pytest.raises(RuntimeError, match="another Emulator"):
        Emulator().start()


def test_module_entry_point_publishes_state_and_stops_on_sigterm(tmp_path: Path) -> None:
    state_file = tmp_path / "local.json"
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "callstream_emulator", "--state-file", str(state_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not state_file.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() - started < 15, "no state file"
            time.sleep(0.05)
        state = json.loads(state_file.read_text())
        assert state["env"]["AWS_ENDPOINT_URL"] == state["endpoint_url"]
        assert state["endpoint_url"].startswith("http://127.0.0.1:")
        assert state["pid"] == process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert f"AWS_ENDPOINT_URL={state['endpoint_url']}" in out
    assert not state_file.exists()
