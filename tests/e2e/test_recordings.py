"""Recordings end to end: KVS -> ingest -> recorder -> S3 and the recordings stream.

Calls are put into the emulator's KVS in Amazon Connect's layout and
triggered the way Connect does; ingest and the recorder run as separate
processes with RECORDINGS_FORMAT=both and a KMS key of the emulator's. Asserted,
sample for sample: the stereo WAV's left channel is the customer's PCM and
its right channel the agent's, shifted by the agent's late start, with
silence exactly where fragments are missing from the stream (ingest reports
them as gaps); each per-track WAV is the header and exactly the PCM put into
KVS (gaps silent), as the reference Lambda wrote it; each recording is
announced once on the recordings stream with the object's byte count and
the CRC32 S3 holds; a long call is streamed in parts (multipart, 5 MiB);
every object is encrypted with the configured key; a stream with no audio
stores nothing. The live view's board shows what the recordings stream says.
"""

from __future__ import annotations

import random
import socket
import time
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callstream import aws
from callstream.bus.tail import StreamTail
from callstream.events import CallEnded, RecordingStored
from callstream.mkv.writer import ConnectCallWriter
from callstream.service import ensure_stream
from callstream_emulator import s3_recordings
from callstream_emulator.demo import adopt_env, local_env
from callstream_emulator.kvs_producer import put_media
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision
from callstream_emulator.simulator import ensure_kvs_stream
from services.ingest.lambda_function import lambda_handler
from services.recorder.wav import checksum_b64

pytestmark = pytest.mark.integration
FRAGMENT = 16384  # PCM bytes per track in one Connect fragment (1.024 s)
RECORDINGS = "callstream-recordings"


@pytest.fixture(scope="module")
def stack(emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    patches = s3_recordings.apply()  # KMS keys and NoSuchUpload as S3 answers them
    workdir = tmp_path_factory.mktemp("recordings")
    env = local_env(emulator, workdir)
    adopt_env(env)
    kms = aws.client("kms", env["APP_REGION"])
    key_arn = kms.create_key(Description="recordings")["KeyMetadata"]["Arn"]
    env |= {"RECORDINGS_FORMAT": "both", "RECORDINGS_KMS_KEY_ID": key_arn}
    provision(env)
    ensure_stream(aws.client("kinesis", env["APP_REGION"]), RECORDINGS)  # not in provision()
    group = ServiceGroup(env, workdir / "logs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        health_port = s.getsockname()[1]
    group.overrides["recorder"] = {
        "CALLSTREAM_HEALTH_PORT": str(health_port),
        "CALLSTREAM_METRICS": "prometheus",
    }
    group.start(names=("ingest", "recorder"))
    yield {
        **env,
        "RECORDER_LOG": str(workdir / "logs" / "recorder-0.log"),
        "RECORDER_HEALTH": f"http://127.0.0.1:{health_port}",
    }
    group.stop()
    patches.revert()
    for process in group.processes:
        text = process.log_path.read_text()
        assert '"level": "ERROR"' not in text, process.log_path


def noise(seconds: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(seconds * 8000) * 2)


def play(
    env: dict[str, str],
    customer: bytes,
    agent: bytes,
    agent_from: int = 0,
    skipped: frozenset[int] = frozenset(),
) -> tuple[str, int]:
    """Put a call into KVS fragment by fragment (the agent's audio from fragment
    `agent_from` on; fragments in `skipped` lost) and trigger it; (contact, start ms)."""
    region = env["APP_REGION"]
    contact = str(uuid.uuid4())
    arn = ensure_kvs_stream(region, f"recordings-{contact[:8]}")
    start_ms = int(time.time() * 1000) - 3_600_000
    writer = ConnectCallWriter(contact, "instance", start_ms)
    body = [writer.producer_header()]
    for index, offset in enumerate(range(0, len(customer), FRAGMENT)):
        side = agent[offset : offset + FRAGMENT] if index >= agent_from else b""
        fragment = writer.producer_fragment(customer[offset : offset + FRAGMENT], side)
        if index not in skipped:
            body.append(fragment)
    endpoint = aws.client("kinesisvideo", region).get_data_endpoint(
        StreamARN=arn, APIName="PUT_MEDIA"
    )["DataEndpoint"]
    acks = put_media(
        endpoint,
        arn,
        body,
        region=region,
        credentials=aws.session(region).get_credentials(),
        producer_start_ms=start_ms,
    )
    first = next(a["FragmentNumber"] for a in acks if a["EventType"] == "PERSISTED")
    answer = lambda_handler(
        {"streamARN": arn, "connectContactId": contact, "startFragmentNum": first}
    )
    assert answer["status"] == "accepted", answer
    return contact, start_ms


def placed(pcm: bytes, first: int = 0, skipped: frozenset[int] = frozenset()) -> bytes:
    """A track as the recorder places it from its first fragment: lost fragments silent
    (none of these calls loses its last fragment)."""
    out = bytearray()
    for index in range(first, (len(pcm) + FRAGMENT - 1) // FRAGMENT):
        piece = pcm[index * FRAGMENT : (index + 1) * FRAGMENT]
        out += bytes(len(piece)) if index in skipped else piece
    return bytes(out)


def stereo(left: bytes, right: bytes) -> bytes:
    frames = max(len(left), len(right)) // 2
    left, right = left.ljust(frames * 2, b"\0"), right.ljust(frames * 2, b"\0")
    out = bytearray(frames * 4)
    out[0::4], out[1::4] = left[0::2], left[1::2]
    out[2::4], out[3::4] = right[0::2], right[1::2]
    return bytes(out)


def announced(env: dict[str, str], contact: str, count: int, timeout_s: float) -> list[Any]:
    """The contact's RecordingStored events, once `count` arrived (and a while more)."""
    tail = StreamTail(aws.client("kinesis", env["APP_REGION"]), RECORDINGS)
    found: list[RecordingStored] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < count:
        found += [
            e for e in tail.poll() if isinstance(e, RecordingStored) and e.contact_id == contact
        ]
        time.sleep(0.2)
    assert len(found) >= count, f"{len(found)} of {count} recordings announced: {found}"
    time.sleep(2.0)  # a repeat would come now
    found += [e for e in tail.poll() if isinstance(e, RecordingStored) and e.contact_id == contact]
    return found


def body_of(env: dict[str, str], event: RecordingStored) -> bytes:
    s3 = aws.client("s3", env["APP_REGION"])
    body: bytes = s3.get_object(Bucket=event.bucket, Key=event.key)["Body"].read()
    return body


def test_stereo_and_per_track_wavs_carry_the_kvs_pcm_with_silence_where_it_was_missing(
    stack: dict[str, str],
) -> None:
    customer, agent = noise(12.3, 1), noise(12.3, 2)
    skipped = frozenset({4, 5, 9})
    contact, _ = play(stack, customer, agent, agent_from=2, skipped=skipped)
    events = announced(stack, contact, 3, timeout_s=90)
    assert len(events) == 3, "each recording announced once"
    by_format = {(e.format, e.channel_tracks): e for e in events}
    left = placed(customer, 0, skipped)
    right = placed(agent, 2, skipped)
    wav = body_of(stack, by_format[("stereo", tuple(_tracks()))])
    assert wav[22:24] == b"\x02\x00" and wav[24:28] == (8000).to_bytes(4, "little")
    assert wav[44:] == stereo(left, bytes(2 * FRAGMENT) + right)
    for name, pcm, first in (("AUDIO_FROM_CUSTOMER", customer, 0), ("AUDIO_TO_CUSTOMER", agent, 2)):
        (event,) = [e for e in events if e.format == "per-track" and e.channel_tracks[0] == name]
        assert body_of(stack, event)[44:] == placed(pcm, first, skipped)
    s3 = aws.client("s3", stack["APP_REGION"])
    for event in events:
        body = body_of(stack, event)
        assert event.byte_count == len(body)
        assert event.checksum == checksum_b64(zlib.crc32(body))
        head = s3.head_object(Bucket=event.bucket, Key=event.key, ChecksumMode="ENABLED")
        assert head["ChecksumCRC32"] == event.checksum
        assert head["SSEKMSKeyId"] == stack["RECORDINGS_KMS_KEY_ID"]
        assert head["Metadata"]["contact-id"] == contact
        tags = s3.get_object_tagging(Bucket=event.bucket, Key=event.key)["TagSet"]
        assert {t["Key"]: t["Value"] for t in tags}["duration-ms"] == str(event.duration_ms)


def test_a_long_call_is_streamed_in_5_mib_parts_and_stored_whole(stack: dict[str, str]) -> None:
    customer, agent = noise(200, 3), noise(200, 4)
    contact, _ = play(stack, customer, agent)
    events = announced(stack, contact, 3, timeout_s=240)
    assert len(events) == 3
    (event,) = [e for e in events if e.format == "stereo"]
    assert body_of(stack, event)[44:] == stereo(customer, agent)
    s3 = aws.client("s3", stack["APP_REGION"])
    head = s3.head_object(Bucket=event.bucket, Key=event.key)
    assert head["ETag"].strip('"').endswith("-2")  # two parts: 5 MiB with the header, the rest
    listed = s3.list_objects_v2(Bucket=event.bucket, Prefix="recordings/.incomplete/")
    assert not [o for o in listed.get("Contents", []) if contact in o["Key"]]
    uploads = s3.list_multipart_uploads(Bucket=event.bucket).get("Uploads", [])
    assert not [u for u in uploads if contact in u["Key"]]


def test_the_live_view_lists_recordings_as_they_are_announced(stack: dict[str, str]) -> None:
    import threading

    from services.liveview.adapters import CallStreams, RecordingObjects
    from services.liveview.handler import LiveView
    from services.liveview.settings import LiveViewSettings

    settings = LiveViewSettings.from_env({**stack, "CALLSTREAM_LIVEVIEW_PORT": "0"})
    region = stack["APP_REGION"]
    view = LiveView(
        CallStreams(aws.client("kinesis", region), settings),
        RecordingObjects(aws.client("s3", region)),
    )
    stop = threading.Event()
    follower = threading.Thread(target=view.follow, args=(stop,), daemon=True)
    follower.start()
    try:
        contact, _ = play(stack, noise(3, 5), noise(3, 6))
        deadline = time.monotonic() + 60
        recordings: dict[str, str] = {}
        while time.monotonic() < deadline and len(recordings) < 3:
            cards = [c for c in view.board.snapshot()["calls"] if c["contact_id"] == contact]
            recordings = cards[0]["recordings"] if cards else {}
            time.sleep(0.2)
        assert set(recordings) == {"customer / agent", "customer", "agent"}, recordings
        served = view.recording(recordings["customer / agent"])
        assert served is not None and served[:4] == b"RIFF"
        assert view.recording("recordings/not-on-the-board.wav") is None
    finally:
        stop.set()
        follower.join(10)


def test_a_stream_without_audio_stores_nothing(stack: dict[str, str]) -> None:
    from test_pipeline import _first_fragment, _video_only_mkv

    region = stack["APP_REGION"]
    arn = ensure_kvs_stream(region, f"no-audio-{uuid.uuid4().hex[:8]}")
    endpoint = aws.client("kinesisvideo", region).get_data_endpoint(
        StreamARN=arn, APIName="PUT_MEDIA"
    )["DataEndpoint"]
    now = int(time.time() * 1000)
    credentials = aws.session(region).get_credentials()
    put_media(
        endpoint,
        arn,
        [_video_only_mkv(now)],
        region=region,
        credentials=credentials,
        producer_start_ms=now,
    )
    contact = str(uuid.uuid4())
    first = _first_fragment(region, arn)
    trigger = {"streamARN": arn, "connectContactId": contact, "startFragmentNum": first}
    assert lambda_handler(trigger)["status"] == "accepted"
    tail = StreamTail(aws.client("kinesis", region), "callstream-audio")
    deadline = time.monotonic() + 60
    ended = None
    while ended is None and time.monotonic() < deadline:
        ended = next(
            (e for e in tail.poll() if isinstance(e, CallEnded) and e.contact_id == contact), None
        )
        time.sleep(0.2)
    assert ended is not None
    time.sleep(3)  # the recorder has read it by now
    s3 = aws.client("s3", region)
    listed = s3.list_objects_v2(Bucket=stack["RECORDINGS_BUCKET_NAME"], Prefix="recordings/")
    assert not [o for o in listed.get("Contents", []) if contact in o["Key"]]
    said = [
        line for line in Path(stack["RECORDER_LOG"]).read_text().splitlines() if contact in line
    ]
    assert any("no recording stored: no audio (CallEnded NO_AUDIO_TRACK" in x for x in said)


def _tracks() -> list[Any]:
    from callstream.events import Track

    return [Track.FROM_CUSTOMER, Track.TO_CUSTOMER]


def test_the_recorders_counters_and_the_loops_are_one_metrics_endpoint(
    stack: dict[str, str],
) -> None:
    customer, agent = noise(3.0, 41), noise(3.0, 42)
    contact, _ = play(stack, customer, agent)
    announced(stack, contact, 3, timeout_s=90)
    with urllib.request.urlopen(stack["RECORDER_HEALTH"] + "/metrics", timeout=5) as response:
        text = response.read().decode()
    with urllib.request.urlopen(stack["RECORDER_HEALTH"] + "/readyz", timeout=5) as response:
        assert response.status == 200  # it holds the audio stream's shard
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    # The loop's counters and the recorder's own, on one endpoint.
    loops, recorders = "callstream_records_processed_total", "callstream_recordings_stored_total"
    assert {loops, recorders} <= names, names
