"""The sentiment handler fails at every effect and still leaves the rows of an undisturbed run.

The persister's fault test stream (two interleaved calls: partials, finals, a
final repeated, an empty final, CallEnded) runs through the production
`SentimentHandler` with the offline VADER scorer and the `ServiceLoop` over
the in-memory bus, writing to the DynamoDB double. Every PutItem (and, for
kills, every checkpoint) is failed in turn by the fault-at-every-step harness;
the table is compared with the undisturbed run's. Scoring is a read (no
durable effect), so it is not failed here.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import pytest
from dynamodb_double import DynamoDBDouble, Tables
from effect_faults import MODES, Faults, FaultySource, retried, until_done
from test_persister_faults import NOW_S, POLL, SHARD, transcripts

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.events import TranscriptSegmentProduced
from callstream.runtime import ServiceLoop
from services.sentiment.core import Scorer
from services.sentiment.handler import SentimentHandler
from services.sentiment.settings import SentimentSettings

TABLE = "sentiment"


@cache
def vader() -> Scorer:
    from services.sentiment.engines import VaderScorer

    return VaderScorer()


@dataclasses.dataclass
class World:
    """What survives a kill: the streams, the table, the checkpoints."""

    transcripts: MemoryStream = dataclasses.field(
        default_factory=lambda: MemoryStream("transcripts")
    )
    letters: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("dead"))
    tables: Tables = dataclasses.field(
        default_factory=lambda: Tables({TABLE: ("ContactId", "SegmentId")})
    )
    checkpoints: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        MemoryPublisher(self.transcripts).publish(transcripts())


def run_instance(world: World, faults: Faults) -> None:
    """One sentiment instance from the world's checkpoint to the end of the stream."""
    settings = SentimentSettings.from_env(
        {"APP_REGION": "us-east-1", "CALLSTREAM_SENTIMENT_TABLE": TABLE}
    )
    handler = SentimentHandler(
        settings, vader(), DynamoDBDouble(world.tables, faults), clock=lambda: NOW_S
    )
    source = FaultySource(MemorySource(world.transcripts, world.checkpoints), faults)
    loop = ServiceLoop("sentiment", source, handler, MemoryPublisher(world.letters))
    records = source.poll()
    for start in range(0, len(records), POLL):
        loop.process(records[start : start + POLL])
        retried(handler.tick)
        retried(loop.flush)
        loop.checkpoint()


@pytest.fixture(autouse=True)
def _no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("callstream.runtime.time.sleep", lambda _s: None)


def _run(faults: Faults) -> tuple[World, int]:
    world = World()
    _, crashes = until_done(lambda: run_instance(world, faults))
    return world, crashes


def test_an_undisturbed_run_scores_every_final_once() -> None:
    faults = Faults()
    world, _ = _run(faults)
    finals = {
        (e.contact_id, e.segment_id): e.transcript
        for e in transcripts()
        if isinstance(e, TranscriptSegmentProduced) and not e.is_partial and e.transcript.strip()
    }
    rows = world.tables.rows[TABLE]
    assert {key: row["Transcript"] for key, row in rows.items()} == finals
    assert {row["Sentiment"] for row in rows.values()} >= {"POSITIVE", "NEGATIVE"}
    assert world.letters.shards[0] == []
    assert world.checkpoints[SHARD] == (str(len(transcripts())), False)
    assert faults.seen.count("put") == len(finals) + 1  # one final is published twice


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_at_any_write_or_checkpoint_leaves_the_same_rows(mode: str) -> None:
    reference, _ = _run(Faults())
    probe = Faults(mode=mode)
    _run(probe)
    assert len(probe.seen) >= 8
    for k in range(len(probe.seen)):
        faults = Faults(fail_at=k, mode=mode)
        world, crashes = _run(faults)
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired, where
        assert crashes == (1 if mode.startswith("crash") else 0), where
        assert world.tables.contents() == reference.tables.contents(), where
        assert world.letters.shards[0] == [], where
        assert world.checkpoints[SHARD] == (str(len(transcripts())), False), where
