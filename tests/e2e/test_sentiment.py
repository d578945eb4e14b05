"""The sentiment consumer, added as docs/add-a-consumer.md says, next to the four services.

The embedded emulator runs the four services unchanged; `sentiment` is started
as one more process (`ServiceGroup.start(("sentiment",))`, step 5 of the recipe).
The sample call is played; every final segment on the transcripts stream gets
exactly one sentiment row, and the persister still writes its rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from callstream import aws
from callstream_emulator.demo import adopt_env, local_env, play_sample_call, watch_call
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision
from services.sentiment.core import LABELS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SPEED = 2.0
TABLE = "callstream-sentiment"


@pytest.fixture(scope="module")
def stack(emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    workdir = tmp_path_factory.mktemp("sentiment")
    env = {**local_env(emulator, workdir), "CALLSTREAM_SENTIMENT_TABLE": TABLE}
    adopt_env(env)
    provision(env)
    group = ServiceGroup(env, workdir / "logs")
    group.start()  # ingest, transcriber, recorder, persister: unchanged
    group.start(("sentiment",))  # the new consumer, started like the others
    _wait_consuming(group)
    yield env
    group.stop()
    for process in group.processes:
        assert process.name != "sentiment" or '"level": "ERROR"' not in process.log_path.read_text()


def _wait_consuming(group: ServiceGroup) -> None:
    """Every service is past start-up (the transcriber has loaded its model)."""
    deadline = time.monotonic() + 240
    for process in group.processes:
        while "consuming " not in process.log_path.read_text():
            assert process.alive(), process.log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{process.name} did not start consuming"
            time.sleep(0.2)


def _sentiment_rows(env: dict[str, str], contact_id: str, expected: int) -> list[dict[str, Any]]:
    table = aws.session(env["APP_REGION"]).resource("dynamodb").Table(TABLE)
    deadline = time.monotonic() + 120
    while True:
        rows: list[dict[str, Any]] = table.query(
            KeyConditionExpression="ContactId = :c",
            ExpressionAttributeValues={":c": contact_id},
            ConsistentRead=True,
        )["Items"]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_every_final_segment_gets_one_sentiment_row_next_to_the_persisters_rows(
    stack: dict[str, str],
) -> None:
    contact_id = play_sample_call(stack, speed=SPEED)
    outcome = watch_call(stack, contact_id, timeout_s=240)
    assert outcome.ended is not None, "the call did not end"
    finals = {s.segment_id: s for s in outcome.finals if s.transcript.strip()}
    assert finals, "no final segments"
    rows = _sentiment_rows(stack, contact_id, len(finals))
    assert {r["SegmentId"] for r in rows} == set(finals)
    assert len(rows) == len(finals)
    for row in rows:
        segment = finals[row["SegmentId"]]
        assert row["Transcript"] == segment.transcript
        assert row["Speaker"] == segment.track.speaker
        assert row["Sentiment"] in LABELS and row["Engine"] == "vader"
    assert {r["Speaker"] for r in rows} == {"customer", "agent"}
    assert any(r["Sentiment"] != "NEUTRAL" for r in rows)  # "the winter of despair"
    assert all(outcome.rows.values()), "the persister's rows are missing"
