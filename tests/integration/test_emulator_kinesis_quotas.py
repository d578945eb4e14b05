"""The emulator's Kinesis per-shard quotas, through boto3, at AWS's documented figures.

Per shard: writes 1 MiB/s or 1,000 records/s (PutRecords fails entry by
entry, PutRecord whole); GetRecords 5 calls/s and 2 MiB/s shared by every
caller, at most 10,000 records and 10 MiB per call. Most tests stop the
quotas' clock (`frozen`), so the arithmetic is exact whatever the machine's
speed; one test runs on the wall clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from callstream.cli import main
from callstream_emulator.emulator import Emulator
from callstream_emulator.faults import remote_faults, remote_snapshot
from callstream_emulator.kinesis_quotas import MIB

pytestmark = pytest.mark.integration
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})
SHARD = "shardId-000000000000"
REPO = Path(__file__).resolve().parents[2]


class ManualClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def frozen(emulator: Emulator) -> Iterator[ManualClock]:
    """Stop the quotas' clock for one test (buckets of streams made now use it)."""
    clock = ManualClock()
    previous = emulator.quotas.clock
    emulator.quotas.clock = clock
    yield clock
    emulator.quotas.clock = previous


@pytest.fixture
def kinesis(aws_session: Any) -> Any:
    """A Kinesis client that does not retry, so every throttle is seen."""
    return aws_session.client("kinesis", config=NO_RETRIES)


def _stream(kinesis: Any, shards: int = 1) -> str:
    name = f"quota-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return name


def _entries(count: int, size: int = 10, key: str = "k") -> list[dict[str, Any]]:
    return [{"Data": b"x" * size, "PartitionKey": key} for _ in range(count)]


def _iterator(kinesis: Any, name: str) -> str:
    return str(
        kinesis.get_shard_iterator(
            StreamName=name, ShardId=SHARD, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
    )


def _fill(kinesis: Any, name: str, clock: ManualClock, records: int, size: int) -> None:
    """Write `records` of `size` bytes (key included), a second of quota per MiB."""
    data = size - 1  # partition key "k"
    for _ in range(records):
        kinesis.put_record(StreamName=name, Data=b"y" * data, PartitionKey="k")
        clock.advance(size / MIB + 0.001)


def _throttled(call: Any) -> bool:
    try:
        call()
    except ClientError as e:
        assert e.response["Error"]["Code"] == "ProvisionedThroughputExceededException"
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        return True
    return False


# -- writes -----------------------------------------------------------------------------


def test_put_records_over_1000_records_a_second_fail_entry_by_entry(
    kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    first = kinesis.put_records(StreamName=name, Records=_entries(500))
    second = kinesis.put_records(StreamName=name, Records=_entries(500))
    third = kinesis.put_records(StreamName=name, Records=_entries(500))
    assert first["FailedRecordCount"] == second["FailedRecordCount"] == 0
    assert third["FailedRecordCount"] == 500
    entry = third["Records"][0]
    assert entry["ErrorCode"] == "ProvisionedThroughputExceededException"
    assert entry["ErrorMessage"] == (
        f"Rate exceeded for shard {SHARD} in stream {name} under account 123456789012."
    )
    frozen.advance(0.2505)  # a quarter of a second refills 250 records
    fourth = kinesis.put_records(StreamName=name, Records=_entries(300))
    assert fourth["FailedRecordCount"] == 50
    assert all("SequenceNumber" in r for r in fourth["Records"][:250])
    assert all(r["ErrorCode"] for r in fourth["Records"][250:])


def test_put_records_over_1_mib_a_second_fail_while_other_shards_take_theirs(
    kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis, shards=2)
    low, high = "0", str(2**127)  # ExplicitHashKeys of shard 0 and shard 1
    size = 100 * 1024  # ten of these (plus key) fit in one MiB
    entries = [
        {"Data": b"z" * size, "PartitionKey": "k", "ExplicitHashKey": key}
        for key in (low, high)
        for _ in range(12)
    ]
    result = kinesis.put_records(StreamName=name, Records=entries)
    failed = [bool(r.get("ErrorCode")) for r in result["Records"]]
    assert failed == ([False] * 10 + [True] * 2) * 2
    assert result["FailedRecordCount"] == 4


def test_put_record_over_the_quota_fails_whole(kinesis: Any, frozen: ManualClock) -> None:
    name = _stream(kinesis)
    kinesis.put_records(StreamName=name, Records=_entries(500))
    kinesis.put_records(StreamName=name, Records=_entries(500))
    assert _throttled(lambda: kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k"))
    frozen.advance(0.01)
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")


def test_writes_are_held_near_1000_records_a_second_on_the_wall_clock(kinesis: Any) -> None:
    name = _stream(kinesis)
    started = time.monotonic()
    accepted = 0
    while time.monotonic() - started < 2.0:
        result = kinesis.put_records(StreamName=name, Records=_entries(250))
        accepted += 250 - result["FailedRecordCount"]
    elapsed = time.monotonic() - started
    # One second's burst plus the refill while it ran; never much above.
    assert 1000 + 1000 * elapsed * 0.5 <= accepted <= 1000 + 1000 * elapsed + 1


# -- polling reads ----------------------------------------------------------------------


def test_six_get_records_in_one_second_get_one_throttled(kinesis: Any, frozen: ManualClock) -> None:
    name = _stream(kinesis)
    kinesis.put_record(StreamName=name, Data=b"x", PartitionKey="k")
    iterator = _iterator(kinesis, name)
    outcomes = [_throttled(lambda: kinesis.get_records(ShardIterator=iterator)) for _ in range(6)]
    assert outcomes == [False] * 5 + [True]
    frozen.advance(0.21)  # one call's worth (and a little, against rounding)
    assert not _throttled(lambda: kinesis.get_records(ShardIterator=iterator))
    assert _throttled(lambda: kinesis.get_records(ShardIterator=iterator))


def test_get_records_budget_is_shared_by_every_caller(
    aws_session: Any, kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    other = aws_session.client("kinesis", config=NO_RETRIES)  # another consumer group
    iterators = [_iterator(kinesis, name), _iterator(other, name)]
    outcomes = [
        _throttled(lambda c=client, i=it: c.get_records(ShardIterator=i))
        for _ in range(3)
        for client, it in zip((kinesis, other), iterators, strict=True)
    ]
    assert outcomes.count(True) == 1 and outcomes[-1]


def test_reads_over_2_mib_a_second_throttle_until_the_overdraft_is_repaid(
    kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    _fill(kinesis, name, frozen, records=30, size=100 * 1024)  # 3,000 KiB
    page = kinesis.get_records(ShardIterator=_iterator(kinesis, name))
    assert len(page["Records"]) == 30  # under 10 MiB: all of it, 1 MiB past the budget
    iterator = page["NextShardIterator"]
    frozen.advance(0.4)  # repays 0.8 MiB of the ~0.93 MiB overdraft
    assert _throttled(lambda: kinesis.get_records(ShardIterator=iterator))
    frozen.advance(0.1)
    assert not _throttled(lambda: kinesis.get_records(ShardIterator=iterator))


def test_one_get_records_returns_at_most_10_mib_and_resumes_after_it(
    kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    record = MIB - 64
    _fill(kinesis, name, frozen, records=12, size=record)
    page = kinesis.get_records(ShardIterator=_iterator(kinesis, name), Limit=100)
    assert len(page["Records"]) == 10  # 10 x (1 MiB - 64 B) fits, 11 does not
    assert page["MillisBehindLatest"] >= 0
    frozen.advance(5.0)  # the 8 MiB overdraft takes 4 s to repay
    rest = kinesis.get_records(ShardIterator=page["NextShardIterator"], Limit=100)
    numbers = [int(r["SequenceNumber"]) for r in page["Records"] + rest["Records"]]
    assert numbers == list(range(numbers[0], numbers[0] + 12))


def test_limit_is_honoured_and_above_10000_is_an_invalid_argument(
    kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    kinesis.put_records(StreamName=name, Records=_entries(5))
    iterator = _iterator(kinesis, name)
    assert len(kinesis.get_records(ShardIterator=iterator, Limit=3)["Records"]) == 3
    with pytest.raises(ClientError) as raised:
        kinesis.get_records(ShardIterator=iterator, Limit=10_001)
    assert raised.value.response["Error"]["Code"] == "InvalidArgumentException"


# -- visibility and the switch ----------------------------------------------------------


def test_throttles_are_counted_per_operation_stream_and_shard(
    emulator: Emulator, kinesis: Any, frozen: ManualClock
) -> None:
    name = _stream(kinesis)
    for _ in range(3):
        kinesis.put_records(StreamName=name, Records=_entries(400))  # 200 refused
    iterator = _iterator(kinesis, name)
    for _ in range(7):
        _throttled(lambda: kinesis.get_records(ShardIterator=iterator))
    snapshot = remote_snapshot(emulator.control_url)["kinesis_quotas"]
    mine = {
        (t["operation"], t["shard"]): t["count"]
        for t in snapshot["throttles"]
        if t["stream"] == name
    }
    assert mine == {("PutRecords", SHARD): 200, ("GetRecords", SHARD): 2}
    assert snapshot["enabled"] is True
    assert snapshot["limits"]["read_calls_per_s"] == 5
    assert snapshot["usage"][f"{name}/{SHARD}"]["records_written"] == 1000
    with urllib.request.urlopen(f"{emulator.control_url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert (
        "callstream_emulator_kinesis_throttles_total"
        f'{{operation="GetRecords",stream="{name}",shard="{SHARD}"}} 2'
    ) in metrics.splitlines()


def test_callstream_calls_prints_the_throttle_counts_of_the_bus_streams(
    aws_env: dict[str, str],
    kinesis: Any,
    frozen: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = _stream(kinesis)
    monkeypatch.setenv("CALLSTREAM_AUDIO_STREAM", name)
    monkeypatch.setenv("CALLSTREAM_CALLS_STREAM", _stream(kinesis))
    monkeypatch.setenv("CALLSTREAM_TRANSCRIPTS_STREAM", _stream(kinesis))
    kinesis.put_records(StreamName=name, Records=_entries(500))
    kinesis.put_records(StreamName=name, Records=_entries(500))
    kinesis.put_records(StreamName=name, Records=_entries(3))
    frozen.advance(10)  # `calls` itself reads the streams
    assert main(["calls", "--since-minutes", "1"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"kinesis throttles (emulator, per-shard quotas on): {name} PutRecords 3")


def test_quotas_switched_off_over_the_control_route_let_everything_through(
    emulator: Emulator, kinesis: Any, frozen: ManualClock
) -> None:
    # Off on purpose: this test is about the switch itself. The aws_env
    # fixture's faults.clear() turns the quotas back on afterwards.
    remote_faults(emulator.control_url, {"kinesis_quotas": {"enabled": False}})
    name = _stream(kinesis)
    for _ in range(4):
        assert kinesis.put_records(StreamName=name, Records=_entries(500))["FailedRecordCount"] == 0
    iterator = _iterator(kinesis, name)
    for _ in range(10):
        assert not _throttled(lambda: kinesis.get_records(ShardIterator=iterator, Limit=1))
    emulator.faults.clear()
    assert emulator.quotas.enabled


def test_the_emulator_process_announces_quotas_off_when_the_variable_says_so(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "CALLSTREAM_EMULATOR_KINESIS_QUOTAS": "off"}
    state = tmp_path / "local.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "callstream_emulator", "--state-file", str(state)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
    finally:
        process.terminate()
        process.wait(10)
    assert any("Kinesis per-shard quotas: OFF" in line for line in lines), lines
