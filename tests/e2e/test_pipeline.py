"""The walking skeleton end to end: four service processes over the embedded emulator.

The sample call (real speech on both tracks) is played into the local KVS
faster than real time and triggered the way Connect does. Asserted: both
tracks' WAVs in S3 carry exactly the PCM that went into KVS, rows exist for
both tracks without duplicates and their text matches the reference within
the offline engine's error rate, and a call with transcription off yields
WAVs and no rows. Bad input: an undecodable record reaches the dead-letter
stream with its bytes and reason; a stream with no audio track ends its call
with NO_AUDIO_TRACK. All of it twice, with Kinesis's quotas on: once with
every service polling, once with every service on enhanced fan-out.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jiwer
import pytest

from callstream import aws
from callstream.bus.tail import StreamTail
from callstream.events import CallEnded, DeadLetter, EndReason
from callstream.mkv import ebml
from callstream_emulator.demo import (
    SAMPLE_DIR,
    CallOutcome,
    adopt_env,
    local_env,
    play_sample_call,
    watch_call,
)
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision
from callstream_emulator.simulator import read_wav_pcm

pytestmark = pytest.mark.integration
SPEED = 4.0
# The offline engine's WER on the sample call, measured by bench/asr_offline.py, plus headroom
# for the chunking of a live stream; a broken pipeline (lost or reordered audio) lands far above.
MAX_WER = 0.15


@pytest.fixture(scope="module", params=["polling", "efo"])
def stack(
    request: pytest.FixtureRequest, emulator: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """The four services in one read mode (the Kinesis quotas are on, as everywhere)."""
    workdir = tmp_path_factory.mktemp(f"stack-{request.param}")
    # One WAV per track, as the reference wrote them (the stereo default is checked
    # in tests/e2e/test_recordings.py).
    env = {**local_env(emulator, workdir), "RECORDINGS_FORMAT": "per-track"}
    env["CALLSTREAM_READ_MODE"] = request.param
    adopt_env(env)
    provision(env)
    group = ServiceGroup(env, workdir / "logs")
    group.start()
    yield env
    group.stop()
    for process in group.processes:
        text = process.log_path.read_text()
        assert '"level": "ERROR"' not in text or "dead-lettered" in text, process.log_path


@pytest.fixture(scope="module")
def sample_calls(stack: dict[str, str]) -> dict[str, CallOutcome]:
    transcribed = play_sample_call(stack, speed=SPEED)
    silent = play_sample_call(stack, speed=SPEED, transcription=False)
    return {
        "transcribed": watch_call(stack, transcribed, timeout_s=180),
        "untranscribed": watch_call(stack, silent, timeout_s=60),
    }


def _normalise(text: str) -> str:
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def test_each_wav_carries_exactly_the_pcm_put_into_kvs(
    stack: dict[str, str], sample_calls: dict[str, CallOutcome]
) -> None:
    s3 = aws.client("s3", stack["APP_REGION"])
    for outcome in sample_calls.values():
        assert len(outcome.recordings) == 2, outcome.recordings
        for key in outcome.recordings:
            track = "customer" if key.endswith("AUDIO_FROM_CUSTOMER.wav") else "agent"
            body = s3.get_object(Bucket=stack["RECORDINGS_BUCKET_NAME"], Key=key)["Body"].read()
            assert body[:4] == b"RIFF" and body[8:12] == b"WAVE"
            assert body[44:] == read_wav_pcm(SAMPLE_DIR / f"{track}.wav")
            head = s3.head_object(Bucket=stack["RECORDINGS_BUCKET_NAME"], Key=key)
            assert head["ContentType"] == "audio/wav"
            assert head["Metadata"]["contact-id"] == outcome.contact_id


def test_rows_for_both_tracks_match_the_reference_without_duplicates(
    sample_calls: dict[str, CallOutcome],
) -> None:
    outcome = sample_calls["transcribed"]
    assert outcome.ended is not None and outcome.ended.reason is EndReason.END_OF_STREAM
    reference = json.loads((SAMPLE_DIR / "reference.json").read_text())
    for table, track in (
        ("contactTranscriptSegments", "AUDIO_FROM_CUSTOMER"),
        ("contactTranscriptSegmentsToCustomer", "AUDIO_TO_CUSTOMER"),
    ):
        rows = outcome.rows[table]
        assert rows, f"no rows in {table}"
        assert len({r["StartTime"] for r in rows}) == len(rows)
        assert len({r["SegmentId"] for r in rows}) == len(rows)
        assert not any(r["IsPartial"] for r in rows)
        said = " ".join(r["Transcript"] for r in sorted(rows, key=lambda r: r["StartTime"]))
        expected = " ".join(u["text"] for u in reference if u["track"] == track)
        wer = jiwer.wer(_normalise(expected), _normalise(said))
        print(f"{track}: WER {wer:.1%} over {len(expected.split())} words")
        assert wer <= MAX_WER, (track, said)


def test_a_call_without_transcription_yields_wavs_and_no_rows(
    sample_calls: dict[str, CallOutcome],
) -> None:
    outcome = sample_calls["untranscribed"]
    assert outcome.ended is not None
    assert len(outcome.recordings) == 2
    assert all(rows == [] for rows in outcome.rows.values())


def test_an_undecodable_record_goes_to_the_dead_letter_stream(stack: dict[str, str]) -> None:
    kinesis = aws.client("kinesis", stack["APP_REGION"])
    garbage = b"not avro at all " + uuid.uuid4().bytes
    kinesis.put_record(StreamName="callstream-audio", PartitionKey="poison", Data=garbage)
    letters = _wait_for(
        StreamTail(kinesis, "callstream-deadletters"),
        lambda e: isinstance(e, DeadLetter) and e.data == garbage,
        count=2,  # transcriber and recorder both read the audio stream
    )
    assert {letter.service for letter in letters} == {"transcriber", "recorder"}
    assert all("not an Avro single-object record" in letter.reason for letter in letters)
    assert all(letter.source_stream == "callstream-audio" for letter in letters)


def test_a_stream_without_audio_tracks_ends_the_call_with_the_reason(
    stack: dict[str, str],
) -> None:
    from callstream_emulator.kvs_producer import put_media
    from callstream_emulator.simulator import ensure_kvs_stream
    from services.ingest.lambda_function import lambda_handler

    region = stack["APP_REGION"]
    arn = ensure_kvs_stream(region, "no-audio-stream")
    endpoint = aws.client("kinesisvideo", region).get_data_endpoint(
        StreamARN=arn, APIName="PUT_MEDIA"
    )
    now = int(time.time() * 1000)
    put_media(
        endpoint["DataEndpoint"],
        arn,
        [_video_only_mkv(now)],
        region=region,
        credentials=aws.session(region).get_credentials(),
        producer_start_ms=now,
    )
    contact = str(uuid.uuid4())
    assert (
        lambda_handler(
            {
                "streamARN": arn,
                "connectContactId": contact,
                "startFragmentNum": _first_fragment(region, arn),
            }
        )["status"]
        == "accepted"
    )
    (ended,) = _wait_for(
        StreamTail(aws.client("kinesis", region), "callstream-audio"),
        lambda e: isinstance(e, CallEnded) and e.contact_id == contact,
    )
    assert ended.reason is EndReason.NO_AUDIO_TRACK


def _video_only_mkv(timecode_ms: int) -> bytes:
    track = ebml.element(
        ebml.TRACK_ENTRY,
        ebml.uint_element(ebml.TRACK_NUMBER, 1)
        + ebml.uint_element(ebml.TRACK_UID, 1)
        + ebml.uint_element(ebml.TRACK_TYPE, 1)
        + ebml.str_element(ebml.NAME, "camera")
        + ebml.str_element(ebml.CODEC_ID, "V_MPEG4/ISO/AVC"),
    )
    info = ebml.element(ebml.INFO, ebml.uint_element(ebml.TIMECODE_SCALE, 1_000_000))
    block = ebml.element(ebml.SIMPLE_BLOCK, b"\x81\x00\x00\x80" + b"\x00" * 64)
    cluster = ebml.element(ebml.CLUSTER, ebml.uint_element(ebml.TIMECODE, timecode_ms) + block)
    segment = info + ebml.element(ebml.TRACKS, track) + cluster
    return (
        ebml.ebml_header()
        + ebml.encode_id(ebml.SEGMENT)
        + ebml.encode_size(ebml.UNKNOWN_SIZE)
        + segment
    )


def _first_fragment(region: str, arn: str) -> str:
    endpoint = aws.client("kinesisvideo", region).get_data_endpoint(
        StreamARN=arn, APIName="LIST_FRAGMENTS"
    )
    archive = aws.client(
        "kinesis-video-archived-media", region, endpoint_url=endpoint["DataEndpoint"]
    )
    fragments = archive.list_fragments(StreamARN=arn)["Fragments"]
    return str(min(int(f["FragmentNumber"]) for f in fragments))


def _wait_for(tail: StreamTail, match: Any, count: int = 1, timeout_s: float = 30.0) -> list[Any]:
    found: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(found) < count:
        found.extend(e for e in tail.poll() if match(e))
        time.sleep(0.1)
    assert len(found) >= count, f"only {len(found)} of {count} matching records in {tail.stream}"
    return found
