"""A recorder killed at several points of a long call finishes the same object from its parts.

A 10-minute call (AudioChunkCaptured of both tracks, interleaved as ingest
publishes them, then CallEnded) goes through the production handler and
service loop; the in-memory bus carries the records, S3 (5 MiB parts, SSE-KMS
with a key of the emulator's), DynamoDB (progress) are the embedded emulator
through boto3. An instance is dropped at 30 %, 55 % and 80 % of the call, as
by SIGKILL (no last checkpoint, its spool gone with it); the next takes over
from the checkpoint the last one left and the progress it saved.

Counted: the records each successor reads again (those its predecessor had
handled). They start exactly at the first chunk not yet in a stored part (the
head or an uploaded part, as S3 holds them), so they are never more than a
part's worth (5 MiB of stereo: 164 s, 2,560 records), however far into the
call the kill came. The object is the undisturbed call's, byte for byte, and
is announced once.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callstream import aws
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record
from callstream.contract import default_contract
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    RecordingStored,
    Track,
)
from callstream.progress import DynamoProgress
from callstream.runtime import ServiceLoop
from callstream_emulator import s3_recordings
from services.recorder.handler import RecorderHandler
from services.recorder.settings import RecorderSettings
from services.recorder.wav import checksum_b64

pytestmark = pytest.mark.integration
CHUNK = 2048  # 128 ms
SECONDS = 600
PART_RECORDS = (5 * 1024 * 1024 // 4) // (CHUNK // 2) * 2  # a 5 MiB stereo part: 2,560
T0 = 1_700_000_000_000
SHARD = "shardId-000000000000"


@pytest.fixture(scope="module")
def s3_patched(emulator: Any) -> Iterator[None]:
    patches = s3_recordings.apply()
    yield
    patches.revert()


def track_pcm(seed: int) -> bytes:
    return random.Random(seed).randbytes(SECONDS * 16000)


def publish_call(audio: MemoryStream, contact: str, customer: bytes, agent: bytes) -> int:
    """The call's records, as ingest publishes them; returns how many."""
    events: list[Event] = [CallStarted(contact, "arn", 0)]
    for at in range(0, len(customer), CHUNK):
        for track, pcm in ((Track.FROM_CUSTOMER, customer), (Track.TO_CUSTOMER, agent)):
            samples = at // 2
            events.append(
                AudioChunkCaptured(
                    contact,
                    track,
                    at // CHUNK,
                    samples,
                    samples // 8,
                    T0 + samples // 8,
                    pcm[at : at + CHUNK],
                    str(at // (8 * CHUNK)),
                )
            )
    counts = {t.value: -(-len(customer) // CHUNK) for t in Track}
    events.append(
        CallEnded(contact, EndReason.END_OF_STREAM, 0, chunk_counts=counts, call_start_time_ms=T0)
    )
    MemoryPublisher(audio).publish(events)
    return len(events)


class Counting:
    """The handler, noting every record it is given."""

    def __init__(self, inner: RecorderHandler) -> None:
        self.inner = inner
        self.seen: list[int] = []

    def handle(self, event: Event, record: Record) -> None:
        self.seen.append(int(record.sequence_number))
        self.inner.handle(event, record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclasses.dataclass
class World:
    bucket: str
    table: str
    kms_key: str
    audio: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("audio"))
    out: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("recordings"))
    dead: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("dead"))
    checkpoints: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    def instance(self, spool: Path) -> tuple[Counting, ServiceLoop]:
        settings = RecorderSettings.from_env(
            {
                "RECORDINGS_BUCKET_NAME": self.bucket,
                "CALLSTREAM_SPOOL_DIR": str(spool),
                "RECORDINGS_KMS_KEY_ID": self.kms_key,
                "CALLSTREAM_WORKER_ID": f"recorder-{uuid.uuid4().hex[:6]}",
            }
        )
        handler = RecorderHandler(
            settings,
            aws.client("s3", "us-east-1"),
            sink=MemoryPublisher(self.out),
            progress=DynamoProgress(aws.client("dynamodb", "us-east-1"), self.table, "recorder"),
        )
        counting = Counting(handler)
        loop = ServiceLoop(
            "recorder",
            MemorySource(self.audio, self.checkpoints),
            counting,  # type: ignore[arg-type]
            MemoryPublisher(self.dead),
        )
        return counting, loop


def run(loop: ServiceLoop, until: int | None = None) -> None:
    """Handle records (to record number `until`, then die without a last checkpoint)."""
    for record in loop.source.poll():
        if until is not None and int(record.sequence_number) > until:
            return
        loop.process([record])
        loop.checkpoint()
    loop.flush()
    loop.checkpoint()


def stored_frames(s3: Any, bucket: str) -> int:
    """Stereo frames of the recording stored so far: the head and the uploaded parts."""
    heads = s3.list_objects_v2(Bucket=bucket, Prefix="recordings/.incomplete/").get("Contents", [])
    pcm = sum(o["Size"] for o in heads)
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        parts = s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        pcm += sum(p["Size"] for p in parts.get("Parts", []) if p["PartNumber"] > 1)
    return pcm // 4


def test_a_recorder_killed_three_times_finishes_the_same_object_reading_back_little(
    aws_session: Any, s3_patched: None, tmp_path: Path
) -> None:
    s3 = aws_session.client("s3")
    bucket = f"takeover-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    kms_key = aws_session.client("kms").create_key()["KeyMetadata"]["Arn"]
    world = World(bucket, f"progress-{uuid.uuid4().hex[:8]}", kms_key)
    customer, agent = track_pcm(1), track_pcm(2)
    total = publish_call(world.audio, "long-call", customer, agent)

    rereads = []
    previous_end = 0
    for share in (0.30, 0.55, 0.80, None):
        counting, loop = world.instance(tmp_path / uuid.uuid4().hex)
        until = int(total * share) if share is not None else None
        run(loop, until)
        first = counting.seen[0]
        if previous_end:
            rereads.append(previous_end - first + 1)
        if until is not None:
            frames = stored_frames(s3, bucket)  # what the successor must not read again
            samples_per_chunk = CHUNK // 2
            first_needed = frames // samples_per_chunk  # first chunk not wholly stored
            expected_first = 2 + 2 * first_needed  # CallStarted is record 1; two per chunk
            expected_first = min(expected_first, until + 1)
            assert int(world.checkpoints[SHARD][0]) == expected_first, (share, frames)
            previous_end = until

    assert len(rereads) == 3
    assert all(0 < r <= PART_RECORDS + 2 for r in rereads), rereads
    assert sum(rereads) < total * 0.30  # never back to the call's start
    (event,) = [
        e
        for e in (default_contract().decode(r.data) for r in world.out.shards[0])
        if isinstance(e, RecordingStored)
    ]
    body = s3.get_object(Bucket=bucket, Key=event.key)["Body"].read()
    expected = bytearray(len(customer) * 2)
    expected[0::4], expected[1::4] = customer[0::2], customer[1::2]
    expected[2::4], expected[3::4] = agent[0::2], agent[1::2]
    assert body[44:] == bytes(expected)
    assert event.checksum == checksum_b64(zlib.crc32(body)) and event.duration_ms == SECONDS * 1000
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket, Prefix="recordings/.incomplete/").get("KeyCount") == 0
    assert world.dead.shards[0] == []
    assert world.checkpoints[SHARD] == (str(total), False)
    print(f"records re-read by each successor: {rereads} of {total}")
