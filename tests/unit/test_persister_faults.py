"""The persister fails at every effect and still leaves exactly the rows of an undisturbed run.

A transcripts stream of two interleaved calls (partials growing into a final
that replaces them, a partial never finalised, a partial repeated after its
final as a transcriber takeover sends it, a final repeated as a lost publish
response does, an empty final, CallEnded) runs through the production
`PersisterHandler` and `ServiceLoop` over the in-memory bus, writing to the
DynamoDB double (tests/dynamodb_double.py). Every conditional PutItem and
BatchWriteItem (and, for kills, every checkpoint) is failed in turn by the
fault-at-every-step harness (tests/effect_faults.py); the tables are compared
with the undisturbed run's, with SAVE_PARTIAL_TRANSCRIPTS on and off, with the
production batch sizes and with small ones (a flush inside `handle`, several
BatchWriteItems per flush, a throttled table answering UnprocessedItems, an
outage outlasting a flush's deadline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from dynamodb_double import DynamoDBDouble, Tables
from effect_faults import MODES, Faults, FaultySource, retried, until_done

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.events import CallEnded, EndReason, Event, Track, TranscriptSegmentProduced
from callstream.runtime import ServiceLoop
from services.persister.handler import PersisterHandler
from services.persister.settings import PersisterSettings

SHARD = "shardId-000000000000"
CUSTOMER, AGENT = "fromCustomer", "toCustomer"
A, B = "5d7f9a52-0000-4000-8000-00000000000a", "5d7f9a52-0000-4000-8000-00000000000b"
NOW_S = 1_700_000_000.0  # the handler's clock: rows carry LoggedOn and ExpiresAfter
POLL = 5  # records per poll, as a GetRecords page would bring them


@dataclasses.dataclass(frozen=True)
class Shape:
    """Batch sizes: the production ones, or small enough to exercise every path."""

    name: str
    flush_at: int | None = None  # buffered finals that flush inside handle (None: as shipped)
    batch_items: int | None = None  # rows per BatchWriteItem (None: 25)
    capacity: int | None = None  # rows the table takes per BatchWriteItem (rest unprocessed)
    deadline_s: float | None = None  # a flush's retry deadline (None: as shipped); 0: no retry


SHAPES = (
    Shape("as-shipped"),
    Shape("small", flush_at=3, batch_items=2, capacity=1),
    # DynamoDB failing for longer than a flush's deadline: the error leaves the flush
    Shape("outlasting", flush_at=3, batch_items=2, deadline_s=0.0),
)


def seg(contact: str, track: Track, start: int, end: int, text: str, partial: bool) -> Event:
    return TranscriptSegmentProduced(
        contact_id=contact,
        track=track,
        segment_id=f"{contact}:{track.value}:{start}",
        start_ms=start,
        end_ms=end,
        transcript=text,
        is_partial=partial,
        engine="test",
        language_code="en-US",
        call_start_time_ms=0,
    )


def transcripts() -> list[Event]:
    """Two calls on one shard, interleaved as the transcriber publishes them."""
    c, a = Track.FROM_CUSTOMER, Track.TO_CUSTOMER
    return [
        seg(A, c, 0, 400, "hello", True),
        seg(B, a, 0, 300, "thank", True),
        seg(A, c, 0, 800, "hello I", True),
        seg(A, a, 200, 600, "good", True),
        seg(B, a, 0, 900, "thank you for", True),
        seg(A, c, 0, 1200, "hello I need help", False),  # replaces A's partials
        seg(B, a, 0, 1400, "thank you for calling", False),
        seg(A, a, 200, 1500, "good morning", False),
        seg(B, c, 1500, 1800, "my card", True),
        seg(A, c, 0, 800, "hello I", True),  # a takeover's repeat: must not replace the final
        seg(A, c, 2000, 2400, "it is", True),
        seg(B, c, 1500, 2600, "my card was stolen", False),
        seg(A, c, 2000, 2900, "it is about my bill", False),
        seg(B, c, 1500, 2600, "my card was stolen", False),  # a publish repeated
        seg(A, a, 3000, 3200, "   ", False),  # nothing said: no row
        seg(B, a, 3000, 3300, "I am sorry", True),
        seg(A, c, 4000, 4300, "and", True),  # the call ends before it is final: kept as partial
        CallEnded(A, EndReason.END_OF_STREAM, 5000),
        seg(B, a, 3000, 3900, "I am sorry to hear that", False),
        seg(B, c, 4200, 4600, "can you", True),
        seg(B, c, 4200, 5100, "can you block it", False),
        CallEnded(B, EndReason.END_OF_STREAM, 6000),
    ]


@dataclasses.dataclass
class World:
    """What survives a kill: the streams, the tables, the checkpoints."""

    transcripts: MemoryStream = dataclasses.field(
        default_factory=lambda: MemoryStream("transcripts")
    )
    letters: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("dead"))
    tables: Tables = dataclasses.field(
        default_factory=lambda: Tables(
            {CUSTOMER: ("ContactId", "StartTime"), AGENT: ("ContactId", "StartTime")}
        )
    )
    checkpoints: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        MemoryPublisher(self.transcripts).publish(transcripts())


def settings(save_partials: bool) -> PersisterSettings:
    return PersisterSettings.from_env(
        {
            "APP_REGION": "us-east-1",
            "TABLE_CALLER_TRANSCRIPT": CUSTOMER,
            "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER": AGENT,
            "SAVE_PARTIAL_TRANSCRIPTS": "TRUE" if save_partials else "FALSE",
            "CALLSTREAM_WORKER_ID": "test",
        }
    )


def run_instance(world: World, faults: Faults, save_partials: bool, shape: Shape) -> None:
    """One persister instance from the world's checkpoint to the end of the stream.

    As `ServiceLoop.run` does per poll, without its `finally` (a kill runs no
    last flush): process the records, flush with retries, checkpoint."""
    handler = PersisterHandler(
        settings(save_partials),
        DynamoDBDouble(world.tables, faults, capacity=shape.capacity),
        clock=lambda: NOW_S,
    )
    if shape.deadline_s is not None:
        handler.deadline_s = shape.deadline_s
    source = FaultySource(MemorySource(world.transcripts, world.checkpoints), faults)
    loop = ServiceLoop("persister", source, handler, MemoryPublisher(world.letters))
    records = source.poll()
    for start in range(0, len(records), POLL):
        loop.process(records[start : start + POLL])
        retried(handler.tick)
        retried(loop.flush)
        loop.checkpoint()


@pytest.fixture(autouse=True)
def _no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("callstream.runtime.time.sleep", lambda _s: None)


@pytest.fixture(params=SHAPES, ids=lambda s: s.name)
def shape(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shape]:
    chosen: Shape = request.param
    if chosen.flush_at is not None:
        monkeypatch.setattr("services.persister.handler.FLUSH_AT", chosen.flush_at)
    if chosen.batch_items is not None:
        monkeypatch.setattr("services.persister.handler.BATCH_ITEMS", chosen.batch_items)
    yield chosen


def _run(save_partials: bool, shape: Shape, faults: Faults) -> tuple[World, int]:
    world = World()
    _, crashes = until_done(lambda: run_instance(world, faults, save_partials, shape))
    return world, crashes


def _rows(world: World, table: str) -> dict[Decimal, tuple[str, bool]]:
    rows = world.tables.rows[table].items()
    return {key[1]: (row["Transcript"], row["IsPartial"]) for key, row in rows}


@pytest.mark.parametrize("save_partials", [True, False], ids=["partials", "finals-only"])
def test_an_undisturbed_run_stores_each_final_over_its_partials(
    save_partials: bool, shape: Shape
) -> None:
    faults = Faults()
    world, _ = _run(save_partials, shape, faults)
    d = Decimal
    customer_a = {d("0"): ("hello I need help", False), d("2"): ("it is about my bill", False)}
    if save_partials:
        customer_a[d("4")] = ("and", True)
    assert _rows(world, CUSTOMER) == {
        **customer_a,
        d("1.5"): ("my card was stolen", False),
        d("4.2"): ("can you block it", False),
    }
    rows = world.tables.rows[AGENT]
    assert {(k[0], k[1]): r["Transcript"] for k, r in rows.items()} == {
        (A, d("0.2")): "good morning",
        (B, d("0")): "thank you for calling",
        (B, d("3")): "I am sorry to hear that",
    }
    assert all(not r["IsPartial"] for r in rows.values())
    assert world.letters.shards[0] == []
    assert world.checkpoints[SHARD] == (str(len(transcripts())), False)
    puts = [k for k in faults.seen if k == "put"]
    assert len(puts) >= (10 if save_partials else 3)


@pytest.mark.parametrize("save_partials", [True, False], ids=["partials", "finals-only"])
@pytest.mark.parametrize("mode", MODES)
def test_a_failure_at_any_write_or_checkpoint_leaves_the_same_rows(
    mode: str, save_partials: bool, shape: Shape
) -> None:
    reference, _ = _run(save_partials, shape, Faults())
    count = len(_seen(save_partials, shape, mode))
    assert count >= 3
    for k in range(count):
        faults = Faults(fail_at=k, mode=mode)
        world, crashes = _run(save_partials, shape, faults)
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired, where
        assert crashes == (1 if mode.startswith("crash") else 0), where
        assert world.tables.contents() == reference.tables.contents(), where
        assert world.letters.shards[0] == [], where  # nothing dead-lettered
        assert world.checkpoints[SHARD] == (str(len(transcripts())), False), where


def _seen(save_partials: bool, shape: Shape, mode: str) -> list[str]:
    faults = Faults(mode=mode)
    _run(save_partials, shape, faults)
    return faults.seen


def test_the_double_answers_a_stale_partial_and_a_throttled_batch_as_dynamodb_does() -> None:
    from botocore.exceptions import ClientError

    tables = Tables({CUSTOMER: ("ContactId", "StartTime")})
    db = DynamoDBDouble(tables, capacity=1)
    final = {"ContactId": A, "StartTime": Decimal(0), "IsPartial": False, "Transcript": "x"}
    partial = {**final, "IsPartial": True, "Transcript": "partial"}
    condition: dict[str, Any] = {
        "ConditionExpression": "attribute_not_exists(ContactId) OR IsPartial = :p",
        "ExpressionAttributeValues": {":p": True},
    }
    db.Table(CUSTOMER).put_item(Item=partial, **condition)  # no row yet
    other = {**final, "StartTime": Decimal(1)}
    answer = db.meta.client.batch_write_item(
        RequestItems={CUSTOMER: [{"PutRequest": {"Item": final}}, {"PutRequest": {"Item": other}}]}
    )
    assert answer["UnprocessedItems"] == {CUSTOMER: [{"PutRequest": {"Item": other}}]}
    with pytest.raises(ClientError, match="ConditionalCheckFailed"):
        db.Table(CUSTOMER).put_item(Item=partial, **condition)
    assert tables.rows[CUSTOMER][(A, Decimal(0))]["Transcript"] == "x"
    with pytest.raises(ClientError, match="duplicates"):
        db.meta.client.batch_write_item(
            RequestItems={CUSTOMER: [{"PutRequest": {"Item": final}}] * 2}
        )
    with pytest.raises(TypeError, match="Float"):
        db.Table(CUSTOMER).put_item(Item={**final, "EndTime": 1.5})
