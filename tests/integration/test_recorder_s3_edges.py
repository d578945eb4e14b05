"""The recorder against the emulator's S3 when S3 says no: a KMS key, throttling.

The production handler and loop (S3 steps on a pool of 4, as the service
runs) over the in-memory bus, writing through boto3 to the embedded
emulator, whose S3 answers KMS keys as S3 does (emulator/callstream_emulator/
s3_recordings.py). A key the recorder may not use stops it with the key's
error and stores nothing; S3 throttling a third of object requests while a
call is streamed in 5 MiB parts slows it down and gives the same object.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.contract import default_contract
from callstream.errors import ConfigurationFault
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    EndReason,
    Event,
    RecordingStored,
    Track,
)
from callstream.progress import MemoryProgress
from callstream.runtime import ServiceLoop
from callstream_emulator import s3_recordings
from callstream_emulator.emulator import Emulator
from services.recorder.handler import RecorderHandler
from services.recorder.settings import RecorderSettings
from services.recorder.wav import checksum_b64

pytestmark = pytest.mark.integration
CHUNK = 2048
T0 = 1_700_000_000_000


@pytest.fixture
def s3_patched(emulator: Emulator) -> Iterator[None]:
    patches = s3_recordings.apply()
    yield
    patches.revert()
    emulator.faults.clear()


def call(contact: str, seconds: int) -> tuple[list[Event], bytes]:
    """Both tracks' chunks and CallEnded; the stereo PCM they must give."""
    customer = random.Random(1).randbytes(seconds * 16000)
    agent = random.Random(2).randbytes(seconds * 16000)
    events: list[Event] = []
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
                    "1",
                )
            )
    counts = {t.value: -(-len(customer) // CHUNK) for t in Track}
    events.append(
        CallEnded(contact, EndReason.END_OF_STREAM, 0, chunk_counts=counts, call_start_time_ms=T0)
    )
    stereo = bytearray(len(customer) * 2)
    stereo[0::4], stereo[1::4] = customer[0::2], customer[1::2]
    stereo[2::4], stereo[3::4] = agent[0::2], agent[1::2]
    return events, bytes(stereo)


def recorder(
    aws_session: Any, tmp_path: Path, bucket: str, **env: str
) -> tuple[RecorderHandler, ServiceLoop, MemoryStream, MemoryStream, MemoryStream]:
    settings = RecorderSettings.from_env(
        {"RECORDINGS_BUCKET_NAME": bucket, "CALLSTREAM_SPOOL_DIR": str(tmp_path), **env}
    )
    audio, out, dead = MemoryStream("audio"), MemoryStream("recordings"), MemoryStream("dead")
    handler = RecorderHandler(
        settings,
        aws_session.client("s3"),
        sink=MemoryPublisher(out),
        progress=MemoryProgress(),
        upload_workers=4,
    )
    loop = ServiceLoop("recorder", MemorySource(audio), handler, MemoryPublisher(dead))
    return handler, loop, audio, out, dead


def new_bucket(aws_session: Any) -> str:
    bucket = f"edges-{uuid.uuid4().hex[:8]}"
    aws_session.client("s3").create_bucket(Bucket=bucket)
    return bucket


def test_a_kms_key_the_recorder_may_not_use_stops_it_and_stores_nothing(
    aws_session: Any, s3_patched: None, tmp_path: Path
) -> None:
    kms = aws_session.client("kms")
    disabled = kms.create_key()["KeyMetadata"]["Arn"]
    kms.disable_key(KeyId=disabled.split("/")[-1])
    deny = {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "kms:GenerateDataKey"}
    allow = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*"}
    policy = {
        "Version": "2012-10-17",
        "Statement": [{**allow, "Resource": "*"}, {**deny, "Resource": "*"}],
    }
    denied = kms.create_key(Policy=json.dumps(policy))["KeyMetadata"]["Arn"]
    for key, code in ((disabled, "KMS.DisabledException"), (denied, "AccessDenied")):
        bucket = new_bucket(aws_session)
        handler, loop, audio, _, dead = recorder(
            aws_session, tmp_path / uuid.uuid4().hex, bucket, RECORDINGS_KMS_KEY_ID=key
        )
        events, _ = call("kms-call", 2)
        MemoryPublisher(audio).publish(events)
        with pytest.raises(ConfigurationFault, match=code) as stopped:
            loop.run(threading.Event())
        assert key.split("/")[-1] in str(stopped.value)  # which key
        listed = aws_session.client("s3").list_objects_v2(Bucket=bucket)
        assert listed.get("KeyCount") == 0 and dead.shards[0] == []
        assert not handler.is_settled("kms-call")


def test_s3_throttling_a_third_of_requests_slows_a_streamed_call_and_gives_the_same_object(
    aws_session: Any, emulator: Emulator, s3_patched: None, tmp_path: Path
) -> None:
    bucket = new_bucket(aws_session)
    handler, loop, audio, out, dead = recorder(aws_session, tmp_path, bucket)
    events, stereo = call("slow-call", 200)  # 6.4 MB: two parts
    MemoryPublisher(audio).publish(events)
    emulator.faults.throttle_s3(0.33, seed=7)
    for record in loop.source.poll():
        loop.process([record])
        handler.tick()
        loop.flush()
    handler.drain(timeout_s=120)
    loop.flush()
    emulator.faults.clear()
    decoded = [default_contract().decode(r.data) for r in out.shards[0]]
    (event,) = [e for e in decoded if isinstance(e, RecordingStored)]
    body = aws_session.client("s3").get_object(Bucket=bucket, Key=event.key)["Body"].read()
    assert body[44:] == stereo and event.checksum == checksum_b64(zlib.crc32(body))
    assert dead.shards[0] == []
    assert aws_session.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
