"""A service reading with enhanced fan-out, as deployed: `CALLSTREAM_READ_MODE=efo`.

The recorder runs as its own process (`python -m services.recorder.main`)
against the emulator, quotas on, with no consumer ARN configured: it
registers the consumer named after itself, subscribes to the audio shard and
stores the call's recording.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from callstream import aws
from callstream.bus.kinesis import KinesisPublisher
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream_emulator.demo import local_env
from callstream_emulator.emulator import Emulator
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision

pytestmark = pytest.mark.integration
CHUNK = bytes(range(256)) * 8  # 128 ms of 8 kHz 16-bit PCM


def _call(contact: str, now_ms: int, chunks: int = 5) -> list[Event]:
    events: list[Event] = [CallStarted(contact, "arn:local", now_ms)]
    for seq in range(chunks):
        offset = seq * len(CHUNK) // 2
        for track in (Track.FROM_CUSTOMER, Track.TO_CUSTOMER):
            ms = offset // 8
            events.append(
                AudioChunkCaptured(contact, track, seq, offset, ms, now_ms + ms, CHUNK, "1")
            )
    counts = {track.value: chunks for track in (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)}
    events.append(
        CallEnded(
            contact, EndReason.END_OF_STREAM, now_ms, chunk_counts=counts, call_start_time_ms=now_ms
        )
    )
    return events


def test_the_recorder_reads_with_fan_out_through_the_consumer_it_registers(
    emulator: Emulator, aws_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert emulator.quotas.enabled
    uid = uuid.uuid4().hex[:8]
    env = {
        **local_env(emulator, tmp_path),
        "CALLSTREAM_CALLS_STREAM": f"efo-calls-{uid}",
        "CALLSTREAM_AUDIO_STREAM": f"efo-audio-{uid}",
        "CALLSTREAM_TRANSCRIPTS_STREAM": f"efo-transcripts-{uid}",
        "CALLSTREAM_DEADLETTER_STREAM": f"efo-dead-{uid}",
        "CALLSTREAM_RECORDINGS_STREAM": f"efo-recordings-{uid}",
        "CALLSTREAM_LEASE_TABLE": f"efo-leases-{uid}",
        "CALLSTREAM_PROGRESS_TABLE": f"efo-progress-{uid}",
        "RECORDINGS_BUCKET_NAME": f"efo-recordings-{uid}",
    }
    for name, value in env.items():  # this process's boto3 too, undone after the test
        monkeypatch.setenv(name, value)
    provision(env, audio_shards=1)
    kinesis = aws.client("kinesis", env["APP_REGION"])
    group = ServiceGroup(env, tmp_path / "logs", {"recorder": {"CALLSTREAM_READ_MODE": "efo"}})
    group.start(("recorder",))
    try:
        contact = str(uuid.uuid4())
        KinesisPublisher(kinesis, env["CALLSTREAM_AUDIO_STREAM"]).publish(
            _call(contact, int(time.time() * 1000))
        )
        keys = _wait_for_objects(env["RECORDINGS_BUCKET_NAME"], contact, timeout_s=60)
    finally:
        group.stop()
    assert keys, f"no recording of {contact}; logs in {tmp_path / 'logs'}"
    arn = kinesis.describe_stream_summary(StreamName=env["CALLSTREAM_AUDIO_STREAM"])[
        "StreamDescriptionSummary"
    ]["StreamARN"]
    consumers = kinesis.list_stream_consumers(StreamARN=arn)["Consumers"]
    assert [(c["ConsumerName"], c["ConsumerStatus"]) for c in consumers] == [("recorder", "ACTIVE")]
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("recorder*"))
    assert "enhanced fan-out" in logs


def _wait_for_objects(bucket: str, contact: str, timeout_s: float) -> list[str]:
    s3: Any = aws.client("s3", "us-east-1")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        keys = [o["Key"] for o in listed if contact in o["Key"] and o["Key"].endswith(".wav")]
        if keys:
            return keys
        time.sleep(0.5)
    return []
