"""A transcriber killed mid-call, with the real offline engine and progress in DynamoDB.

The sample call's two tracks go through the production handler and service
loop (the in-memory bus twin carries the records; the progress store is the
boto3 adapter on the embedded emulator). An instance is dropped part-way,
as by SIGKILL, and a second one takes over from the checkpoint the first left.
The finals of the two together must equal an undisturbed run's.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from callstream import aws
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.contract import default_contract
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    Track,
    TranscriptSegmentProduced,
)
from callstream.progress import DynamoProgress
from callstream.runtime import ServiceLoop
from callstream_emulator.simulator import read_wav_pcm
from services.transcriber.handler import TranscriberHandler

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "call"
CHUNK_BYTES = 128 * 16
SHARD = "shardId-000000000000"


@pytest.fixture(scope="module")
def engine() -> Any:
    from callstream.asr.offline.engine import OfflineEngine

    return OfflineEngine()


def publish_call(audio: MemoryStream, contact: str) -> int:
    """CallStarted, both tracks' chunks interleaved as ingest sends them, CallEnded."""
    tracks = {
        Track.FROM_CUSTOMER: read_wav_pcm(SAMPLES / "customer.wav"),
        Track.TO_CUSTOMER: read_wav_pcm(SAMPLES / "agent.wav"),
    }
    events: list[Event] = [CallStarted(contact, "arn", 0, transcription_enabled=True)]
    counts = {}
    longest = max(len(pcm) for pcm in tracks.values())
    for at in range(0, longest, CHUNK_BYTES):
        for track, pcm in tracks.items():
            if at < len(pcm):
                seq = at // CHUNK_BYTES
                offset = at // 2
                events.append(
                    AudioChunkCaptured(
                        contact,
                        track,
                        seq,
                        offset,
                        offset // 8,
                        1_700_000_000_000 + offset // 8,
                        pcm[at : at + CHUNK_BYTES],
                        "1",
                    )
                )
                counts[track.value] = seq + 1
    events.append(CallEnded(contact, EndReason.END_OF_STREAM, 0, chunk_counts=counts))
    MemoryPublisher(audio).publish(events)
    return len(events)


class Instance:
    """One transcriber instance over the shared audio stream and checkpoints."""

    def __init__(self, engine: Any, audio: MemoryStream, checkpoints: dict, table: str) -> None:
        self.now = 0.0
        self.out = MemoryStream("transcripts")
        progress = DynamoProgress(aws.client("dynamodb", "us-east-1"), table, "transcriber")
        self.handler = TranscriberHandler(
            engine, MemoryPublisher(self.out), "en-US", clock=lambda: self.now, progress=progress
        )
        self.loop = ServiceLoop(
            "transcriber", MemorySource(audio, checkpoints), self.handler, MemoryPublisher(audio)
        )

    def run(self, limit: int | None = None) -> None:
        for record in self.loop.source.poll()[:limit]:
            self.now += 0.064  # two tracks' 128 ms chunks: the call at real-time pace
            self.loop.process([record])
            self.handler.tick()
            self.loop.checkpoint()
        if limit is None:
            for _ in range(50):
                self.now += 1.0
                self.handler.tick()
                self.loop.checkpoint()

    def finals(self) -> list[tuple[str, int, int, str]]:
        out = []
        for record in self.out.shards[0]:
            e = default_contract().decode(record.data)
            if isinstance(e, TranscriptSegmentProduced) and not e.is_partial:
                out.append((e.track.value, e.start_ms, e.end_ms, e.transcript))
        return sorted(out)


@pytest.mark.parametrize("killed_at", [0.35, 0.7])
def test_a_killed_instance_s_calls_resume_after_their_last_final_with_the_same_finals(
    aws_session: Any, engine: Any, killed_at: float
) -> None:
    table = f"progress-{uuid.uuid4().hex[:8]}"
    undisturbed = MemoryStream("audio")
    publish_call(undisturbed, "calm")
    alone = Instance(engine, undisturbed, {}, table)
    alone.run()

    audio, checkpoints = MemoryStream("audio"), {}
    total = publish_call(audio, "killed")
    first = Instance(engine, audio, checkpoints, table)
    first.run(limit=int(total * killed_at))
    resumed_at = int(checkpoints[SHARD][0])
    second = Instance(engine, audio, checkpoints, table)
    second.run()

    assert resumed_at > 1, "the checkpoint stayed at CallStarted"
    assert first.finals() and second.finals()
    assert sorted(first.finals() + second.finals()) == alone.finals()
    assert checkpoints[SHARD] == (str(total), False)
