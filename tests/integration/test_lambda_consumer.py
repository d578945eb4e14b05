"""The persister under a Kinesis event source mapping (`callstream.lambda_consumer`).

Batches are built from records read off the emulator's stream, as Lambda
delivers them (real Avro bytes, base64, the ESM's field names), and handed to
`KinesisBatchConsumer` with the real `PersisterHandler` and DynamoDB on the
emulator. A retry is what the ESM would send: the batch again from the lowest
reported sequence number.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from botocore.config import Config

from callstream.bus.kinesis import KinesisPublisher
from callstream.contract import default_contract
from callstream.events import DeadLetter, Track, TranscriptSegmentProduced
from callstream.lambda_consumer import KinesisBatchConsumer
from callstream_emulator.emulator import Emulator
from services.persister.adapters import ensure_tables
from services.persister.handler import PersisterHandler
from services.persister.settings import PersisterSettings

pytestmark = pytest.mark.integration
POISON = b"plain text, not a framed Avro record"
UNKNOWN_WRITER = b"\xc3\x01" + bytes(8) + b"body of a schema this consumer lacks"


@dataclass
class Stack:
    """One test's streams, tables and consumer."""

    session: Any
    transcripts: str
    deadletters: str
    customer: str
    agent: str
    settings: PersisterSettings
    deadline_s: float = 20.0

    def consumer(self) -> KinesisBatchConsumer:
        # no SDK retries: a throttled request reaches the handler at once
        dynamodb = self.session.resource("dynamodb", config=Config(retries={"max_attempts": 1}))

        def make_handler() -> PersisterHandler:
            handler = PersisterHandler(self.settings, dynamodb)
            handler.deadline_s = self.deadline_s
            return handler

        sink = KinesisPublisher(self.session.client("kinesis"), self.deadletters, deadline_s=5)
        return KinesisBatchConsumer("persister", make_handler, sink)

    def rows(self) -> set[tuple[str, str, str, str]]:
        """(table, ContactId, StartTime, Transcript) of every stored row."""
        dynamodb = self.session.client("dynamodb")
        return {
            (table, item["ContactId"]["S"], item["StartTime"]["N"], item["Transcript"]["S"])
            for table in (self.customer, self.agent)
            for item in dynamodb.scan(TableName=table)["Items"]
        }

    def dead_letters(self) -> list[DeadLetter]:
        letters = [default_contract().decode(d) for d in read(self.session, self.deadletters)]
        return [letter for letter in letters if isinstance(letter, DeadLetter)]


@pytest.fixture
def stack(aws_env: dict[str, str], aws_session: Any) -> Iterator[Stack]:
    suffix = uuid.uuid4().hex[:8]
    names = {
        "CALLSTREAM_TRANSCRIPTS_STREAM": f"tx-{suffix}",
        "CALLSTREAM_DEADLETTER_STREAM": f"dl-{suffix}",
        "TABLE_CALLER_TRANSCRIPT": f"cust-{suffix}",
        "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER": f"agent-{suffix}",
        "SAVE_PARTIAL_TRANSCRIPTS": "TRUE",
    }
    kinesis = aws_session.client("kinesis")
    for stream in (names["CALLSTREAM_TRANSCRIPTS_STREAM"], names["CALLSTREAM_DEADLETTER_STREAM"]):
        kinesis.create_stream(StreamName=stream, ShardCount=1)
        kinesis.get_waiter("stream_exists").wait(StreamName=stream)
    tables = [names["TABLE_CALLER_TRANSCRIPT"], names["TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER"]]
    ensure_tables(aws_session.client("dynamodb"), tables)
    yield Stack(
        aws_session,
        names["CALLSTREAM_TRANSCRIPTS_STREAM"],
        names["CALLSTREAM_DEADLETTER_STREAM"],
        tables[0],
        tables[1],
        PersisterSettings.from_env(aws_env | names),
    )


def segment(contact: str, track: Track, start_ms: int, partial: bool = False) -> Any:
    text = f"{'partial' if partial else 'final'} {track.speaker} at {start_ms}"
    segment_id = f"{contact}:{track.value}:{start_ms}"
    return TranscriptSegmentProduced(
        contact, track, segment_id, start_ms, start_ms + 900, text, partial
    )


def read(session: Any, stream: str) -> list[bytes]:
    return [r["Data"] for r in read_records(session, stream)]


def read_records(session: Any, stream: str) -> list[dict[str, Any]]:
    kinesis = session.client("kinesis")
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    return [dict(r, ShardId=shard) for r in kinesis.get_records(ShardIterator=iterator)["Records"]]


def esm_batch(session: Any, stream: str, from_sequence: str | None = None) -> dict[str, Any]:
    """The stream's records as a Kinesis event source mapping delivers them to Lambda."""
    arn = session.client("kinesis").describe_stream_summary(StreamName=stream)[
        "StreamDescriptionSummary"
    ]["StreamARN"]
    records = []
    for r in read_records(session, stream):
        if from_sequence is not None and int(r["SequenceNumber"]) < int(from_sequence):
            continue
        records.append(
            {
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r["PartitionKey"],
                    "sequenceNumber": r["SequenceNumber"],
                    "data": base64.b64encode(r["Data"]).decode(),
                    "approximateArrivalTimestamp": r["ApproximateArrivalTimestamp"].timestamp(),
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": f"{r['ShardId']}:{r['SequenceNumber']}",
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::123456789012:role/persister",
                "awsRegion": "us-east-1",
                "eventSourceARN": arn,
            }
        )
    return {"Records": records}


def publish(stack: Stack, items: list[Any]) -> list[TranscriptSegmentProduced]:
    """Put segments (and raw poison bytes) on the transcripts stream, in order."""
    kinesis = stack.session.client("kinesis")
    contract = default_contract()
    for item in items:
        data = item if isinstance(item, bytes) else contract.encode(item)
        key = "poison" if isinstance(item, bytes) else item.contact_id
        kinesis.put_record(StreamName=stack.transcripts, PartitionKey=key, Data=data)
    return [i for i in items if not isinstance(i, bytes)]


def expected_rows(stack: Stack, segments: list[TranscriptSegmentProduced]) -> set[Any]:
    rows: dict[Any, str] = {}
    for s in segments:
        table = stack.customer if s.track is Track.FROM_CUSTOMER else stack.agent
        key = (table, s.contact_id, str(Decimal(s.start_ms) / 1000))
        if not s.is_partial or key not in rows or "partial" in rows[key]:
            rows[key] = s.transcript
    return {(*key, text) for key, text in rows.items()}


def failed(response: dict[str, Any]) -> list[str]:
    return sorted((f["itemIdentifier"] for f in response["batchItemFailures"]), key=int)


def two_calls() -> list[Any]:
    a, b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    return [
        segment(a, Track.FROM_CUSTOMER, 1000),
        segment(b, Track.TO_CUSTOMER, 1500),
        POISON,
        segment(a, Track.TO_CUSTOMER, 2500),
        segment(b, Track.FROM_CUSTOMER, 3000),
    ]


def test_a_poison_record_is_dead_lettered_and_reported_as_processed(stack: Stack) -> None:
    segments = publish(stack, two_calls())
    response = stack.consumer()(esm_batch(stack.session, stack.transcripts))
    assert response == {"batchItemFailures": []}
    assert stack.rows() == expected_rows(stack, segments)
    (letter,) = stack.dead_letters()
    assert letter.data == POISON and letter.service == "persister"
    assert letter.source_stream == stack.transcripts


def test_throttled_batch_writes_are_retried_within_the_invocation(
    stack: Stack, emulator: Emulator
) -> None:
    segments = publish(stack, two_calls())
    emulator.faults.throttle_dynamodb(0.5, seed=5, operations=["BatchWriteItem"])
    response = stack.consumer()(esm_batch(stack.session, stack.transcripts))
    assert emulator.faults.snapshot()["dynamodb_throttle"]["share"] == 0.5
    assert response == {"batchItemFailures": []}
    assert stack.rows() == expected_rows(stack, segments)


def test_a_batch_the_tables_refuse_is_retried_from_its_first_record_and_nothing_is_lost(
    stack: Stack, emulator: Emulator
) -> None:
    segments = publish(stack, two_calls())
    batch = esm_batch(stack.session, stack.transcripts)
    stack.deadline_s = 0.5
    emulator.faults.throttle_dynamodb(1.0, operations=["BatchWriteItem"])
    response = stack.consumer()(batch)
    every = [r["kinesis"]["sequenceNumber"] for r in batch["Records"]]
    assert failed(response) == every  # the finals were buffered: none is durable
    assert stack.rows() == set()
    emulator.faults.clear()
    retry = esm_batch(stack.session, stack.transcripts, from_sequence=failed(response)[0])
    assert stack.consumer()(retry) == {"batchItemFailures": []}
    assert stack.rows() == expected_rows(stack, segments)
    # The poison record was handled in both invocations: dead-lettered each time, never lost.
    assert {letter.data for letter in stack.dead_letters()} == {POISON}


def test_a_failed_record_leaves_it_and_every_later_one_to_the_retry_in_order(
    stack: Stack, emulator: Emulator
) -> None:
    contact = f"c-{uuid.uuid4().hex[:6]}"
    items = [
        segment(contact, Track.FROM_CUSTOMER, 1000),
        segment(contact, Track.FROM_CUSTOMER, 2000, partial=True),  # written at once: PutItem
        segment(contact, Track.FROM_CUSTOMER, 2000),
        segment(contact, Track.TO_CUSTOMER, 2500),
    ]
    segments = publish(stack, items)
    batch = esm_batch(stack.session, stack.transcripts)
    sequences = [r["kinesis"]["sequenceNumber"] for r in batch["Records"]]
    emulator.faults.throttle_dynamodb(1.0, operations=["PutItem"])
    response = stack.consumer()(batch)
    assert failed(response) == sequences[1:]
    # The record before the failure is done: its buffered final was flushed before answering.
    assert stack.rows() == expected_rows(stack, segments[:1])
    emulator.faults.clear()
    retry = esm_batch(stack.session, stack.transcripts, from_sequence=failed(response)[0])
    assert stack.consumer()(retry) == {"batchItemFailures": []}
    assert stack.rows() == expected_rows(stack, segments)


def test_a_record_of_an_unknown_writer_schema_is_retried_never_dead_lettered(
    stack: Stack,
) -> None:
    contact = f"c-{uuid.uuid4().hex[:6]}"
    segments = publish(stack, [segment(contact, Track.FROM_CUSTOMER, 1000), UNKNOWN_WRITER])
    batch = esm_batch(stack.session, stack.transcripts)
    response = stack.consumer()(batch)
    assert failed(response) == [batch["Records"][1]["kinesis"]["sequenceNumber"]]
    assert stack.rows() == expected_rows(stack, segments)
    assert stack.dead_letters() == []
