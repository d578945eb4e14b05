"""AWS errors at the services' edges, through real boto3 against the emulator.

A missing table or bucket stops the loop (ConfigurationFault) without a
checkpoint past the record and without a dead letter; a row DynamoDB refuses
(over 400 KB) dead-letters the record it came from, with its bytes and the
reason, and the records after it are stored.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from callstream.aws import ensure_table
from callstream.bus.consumer import KinesisSource
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.contract import default_contract
from callstream.errors import ConfigurationFault
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    DeadLetter,
    EndReason,
    Track,
    TranscriptSegmentProduced,
)
from callstream.metrics import CONFIGURATION_FAULTS, Metrics
from callstream.runtime import ServiceLoop

pytestmark = pytest.mark.integration


def _name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def _stream(kinesis: Any) -> str:
    name = _name("edge")
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50}
    )
    return name


def _segment(contact: str, i: int, text: str | None = None) -> TranscriptSegmentProduced:
    return TranscriptSegmentProduced(
        contact,
        Track.FROM_CUSTOMER,
        f"{contact}:{i}",
        i * 1000,
        i * 1000 + 900,
        text if text is not None else f"words {i}",
        False,
    )


def _persister(aws_session: Any, monkeypatch: pytest.MonkeyPatch, table: str) -> Any:
    from services.persister.handler import PersisterHandler
    from services.persister.settings import PersisterSettings

    monkeypatch.setenv("TABLE_CALLER_TRANSCRIPT", table)
    monkeypatch.setenv("TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER", table)
    return PersisterHandler(PersisterSettings.from_env(), aws_session.resource("dynamodb"))


def _records(kinesis: Any, stream: str) -> list[dict[str, Any]]:
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    return list(kinesis.get_records(ShardIterator=iterator)["Records"])


class _Bus:
    """A real stream, lease table and dead-letter stream in the emulator."""

    def __init__(self, aws_session: Any) -> None:
        self.kinesis = aws_session.client("kinesis")
        self.leases = LeaseTable(aws_session.client("dynamodb"), _name("leases"))
        self.leases.ensure_table()
        self.stream, self.dead = _stream(self.kinesis), _stream(self.kinesis)

    def loop(self, handler: Any, metrics: Metrics) -> ServiceLoop:
        source = KinesisSource(
            self.kinesis,
            self.leases,
            stream=self.stream,
            group="edge",
            worker_id="w",
            lease_ms=5000,
        )
        publisher = KinesisPublisher(self.kinesis, self.dead, deadline_s=10)
        return ServiceLoop(
            "edge", source, handler, publisher, poll_interval_s=0.05, metrics=metrics
        )


def test_a_persister_whose_table_is_missing_stops_without_passing_the_record(
    aws_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = _Bus(aws_session)
    KinesisPublisher(bus.kinesis, bus.stream).publish([_segment("c", 0), _segment("c", 1)])
    first = _records(bus.kinesis, bus.stream)[0]["SequenceNumber"]
    metrics = Metrics("persister", "off")
    loop = bus.loop(_persister(aws_session, monkeypatch, _name("missing")), metrics)
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)  # a retried-forever fault would end here instead
    timer.start()
    try:
        with pytest.raises(ConfigurationFault, match="ResourceNotFoundException"):
            loop.run(stop)
    finally:
        timer.cancel()
    (lease,) = bus.leases.scan(f"edge/{bus.stream}/")
    assert lease.checkpoint in (None, first)
    assert lease.checkpoint is None or lease.checkpoint_inclusive  # never past the record
    assert lease.owner is None  # released as on a normal stop
    assert _records(bus.kinesis, bus.dead) == []
    assert metrics.value(CONFIGURATION_FAULTS) == 1


def test_a_row_over_400_kb_dead_letters_its_record_and_the_next_rows_are_stored(
    aws_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = _Bus(aws_session)
    dynamodb = aws_session.client("dynamodb")
    table = _name("rows")
    ensure_table(dynamodb, table, ("ContactId", "S"), ("StartTime", "N"))
    huge = _segment("big", 1, "x" * 420_000)
    KinesisPublisher(bus.kinesis, bus.stream).publish(
        [_segment("a", 0), huge, _segment("a", 2), _segment("b", 3)]
    )
    originals = [r["Data"] for r in _records(bus.kinesis, bus.stream)]
    loop = bus.loop(_persister(aws_session, monkeypatch, table), Metrics("persister", "off"))
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = dynamodb.scan(TableName=table)["Items"]
            if len(rows) == 3 and _records(bus.kinesis, bus.dead):
                break
            time.sleep(0.2)
    finally:
        stop.set()
        runner.join(30)
    assert sorted(r["ContactId"]["S"] for r in dynamodb.scan(TableName=table)["Items"]) == [
        "a",
        "a",
        "b",
    ]
    (letter_record,) = _records(bus.kinesis, bus.dead)
    letter = default_contract().decode(letter_record["Data"])
    assert isinstance(letter, DeadLetter)
    assert letter.data == originals[1]  # the original bytes of the big segment
    assert "ValidationException" in letter.reason and letter.error_type == "PoisonRecordError"
    (lease,) = bus.leases.scan(f"edge/{bus.stream}/")
    last = _records(bus.kinesis, bus.stream)[-1]["SequenceNumber"]
    assert (lease.checkpoint, lease.checkpoint_inclusive) == (last, False)  # all done


def test_a_recorder_whose_bucket_is_missing_stops_the_loop(
    aws_session: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from services.recorder.main import RecorderHandler
    from services.recorder.settings import RecorderSettings

    monkeypatch.setenv("RECORDINGS_BUCKET_NAME", _name("no-such-bucket"))
    monkeypatch.setenv("CALLSTREAM_SPOOL_DIR", str(tmp_path))
    handler = RecorderHandler(RecorderSettings.from_env(), aws_session.client("s3"))
    stream, dead = MemoryStream("audio"), MemoryStream("dead")
    pcm = b"\1\0" * 160
    MemoryPublisher(stream).publish(
        [
            AudioChunkCaptured("c", Track.FROM_CUSTOMER, 0, 0, 0, 1_700_000_000_000, pcm, "1"),
            CallEnded(
                "c",
                EndReason.END_OF_STREAM,
                0,
                chunk_counts={Track.FROM_CUSTOMER.value: 1},
                call_start_time_ms=1_700_000_000_000,
            ),
        ]
    )
    checkpoints: dict[str, tuple[str, bool]] = {}
    source = MemorySource(stream, checkpoints)
    loop = ServiceLoop("recorder", source, handler, MemoryPublisher(dead))
    with pytest.raises(ConfigurationFault, match="NoSuchBucket"):
        loop.run(threading.Event())
    assert dead.shards[0] == []
    assert checkpoints.get("shardId-000000000000") in (None, ("1", True))
    assert not handler.is_settled("c")
