"""`callstream` commands against the embedded emulator, called in-process with `main([...])`.

Covered: `local up`/`local down` through the state file; `replay` of a WAV as a
live call (KVS fragments, CallStarted on the calls stream) and of an MKV
capture; `kvs dump` giving back exactly the PCM played, per track, for one
contact; `tail`, `calls` and `deadletters list` over events put on the streams.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from callstream import aws
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.bus.tail import StreamTail
from callstream.cli import main
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    DeadLetter,
    EndReason,
    Track,
    TranscriptSegmentProduced,
)
from callstream.mkv import write_connect_call
from callstream.service import ensure_stream
from callstream_emulator.provision import provision

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def streams(aws_env: dict[str, str]) -> dict[str, str]:
    provision(aws_env)
    return aws_env


def _tone(seconds: float, hz: float) -> bytes:
    t = np.arange(int(8000 * seconds)) / 8000
    return (np.sin(2 * np.pi * hz * t) * 8000).astype("<i2").tobytes()


def _stereo_wav(path: Path, left: bytes, right: bytes) -> Path:
    both = np.stack([np.frombuffer(left, "<i2"), np.frombuffer(right, "<i2")], axis=1)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(both.astype("<i2").tobytes())
    return path


def _read_wav(path: Path) -> bytes:
    with wave.open(str(path), "rb") as wav:
        return wav.readframes(wav.getnframes())


def _calls_started(region: str, contact_id: str) -> list[CallStarted]:
    tail = StreamTail(aws.client("kinesis", region), "callstream-calls")
    return [e for e in tail.poll() if isinstance(e, CallStarted) and e.contact_id == contact_id]


def _wait_for_state_file(process: subprocess.Popen[bytes], state: Path) -> None:
    """Until the emulator `process` wrote its state file, naming itself."""
    deadline = time.monotonic() + 120
    while not state.exists():
        assert process.poll() is None, f"{process.args} exited"
        assert time.monotonic() < deadline, f"{process.args} wrote no state file"
        time.sleep(0.1)
    assert json.loads(state.read_text())["pid"] == process.pid


def test_local_down_stops_the_emulator_local_up_started(tmp_path: Path) -> None:
    state = tmp_path / "local.json"
    command = [sys.executable, "-m", "callstream.cli", "local", "up", "--state-file", str(state)]
    up = subprocess.Popen(
        [*command, "--port", "0", "--media-port", "0"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_state_file(up, state)
        assert main(["local", "down", "--state-file", str(state), "--timeout", "60"]) == 0
        assert up.wait(timeout=60) == 0
        assert not state.exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_the_emulators_console_script_serves_until_sigterm(tmp_path: Path) -> None:
    # `callstream-emulator`, the script emulator/pyproject.toml installs.
    script = Path(sys.executable).parent / "callstream-emulator"
    assert script.is_file(), "the emulator distribution is not installed (make setup)"
    state = tmp_path / "state.json"
    process = subprocess.Popen(
        [str(script), "--port", "0", "--media-port", "0", "--state-file", str(state)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_state_file(process, state)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert not state.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_replayed_wav_is_triggered_and_dumps_back_byte_for_byte(
    streams: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    customer, agent = _tone(2.0, 440), _tone(2.0, 660)
    wav = _stereo_wav(tmp_path / "call.wav", customer, agent)
    contact = str(uuid.uuid4())
    argv = ["replay", str(wav), "--contact-id", contact, "--speed", "20"]
    assert main(argv) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["contactId"] == contact
    (started,) = _calls_started(streams["APP_REGION"], contact)
    assert started.stream_arn == replayed["streamARN"]
    assert started.start_fragment_number == replayed["fragment"]
    out = tmp_path / "dump"
    dump = ["kvs", "dump", replayed["streamARN"], "--contact-id", contact, "--out", str(out)]
    assert main(dump) == 0
    assert _read_wav(out / f"{contact}_AUDIO_FROM_CUSTOMER.wav") == customer
    assert _read_wav(out / f"{contact}_AUDIO_TO_CUSTOMER.wav") == agent
    assert "read " in capsys.readouterr().err


def test_kvs_dump_of_one_track_as_raw_from_a_fragment(
    streams: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    customer = _tone(1.0, 300)
    wav = tmp_path / "mono.wav"
    with wave.open(str(wav), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(8000)
        handle.writeframes(customer)
    assert main(["replay", str(wav), "--speed", "20", "--no-trigger"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    argv = ["kvs", "dump", replayed["streamARN"], "--track", "customer", "--format", "raw"]
    assert main([*argv, "--out", str(tmp_path), "--timestamp", "0"]) == 0
    (path,) = tmp_path.glob("*.raw")
    assert path.read_bytes() == customer


def test_replayed_mkv_capture_is_put_and_triggered_with_its_contact(
    streams: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    contact = str(uuid.uuid4())
    start_ms = int(time.time() * 1000)
    capture = write_connect_call(_tone(2.0, 500), _tone(2.0, 700), contact, start_epoch_ms=start_ms)
    path = tmp_path / "capture.mkv"
    path.write_bytes(capture)
    assert main(["replay", str(path), "--stream-name", f"mkv-{contact[:8]}"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["contactId"] == contact
    assert _calls_started(streams["APP_REGION"], contact)


def _publish(region: str, stream: str, events: list[Any]) -> None:
    KinesisPublisher(aws.client("kinesis", region), stream).publish(events)


def _segment(contact: str, track: Track, start: int, text: str, partial: bool) -> Any:
    segment_id = f"{contact}:{track.value}:{start}"
    return TranscriptSegmentProduced(contact, track, segment_id, start, start + 900, text, partial)


def test_tail_prints_a_calls_finals_until_it_ends(
    streams: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    contact = str(uuid.uuid4())
    _publish(
        streams["APP_REGION"],
        "callstream-transcripts",
        [
            _segment(contact, Track.FROM_CUSTOMER, 1000, "hel", True),
            _segment(contact, Track.FROM_CUSTOMER, 1000, "hello there", False),
            _segment(contact, Track.TO_CUSTOMER, 2500, "good morning", False),
            CallEnded(contact, EndReason.END_OF_STREAM, int(time.time() * 1000)),
        ],
    )
    assert main(["tail", contact, "--timeout", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[00:01.0] customer: hello there",
        "[00:02.5]    agent: good morning",
        "-- call ended: END_OF_STREAM",
    ]


def test_tail_gives_up_after_its_timeout(
    streams: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tail", str(uuid.uuid4()), "--latest", "--timeout", "0.5"]) == 1
    assert "did not end" in capsys.readouterr().err


def test_calls_lists_an_active_call_with_its_lags(
    streams: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    contact = str(uuid.uuid4())
    now = int(time.time() * 1000)
    chunks = [
        AudioChunkCaptured(
            contact,
            Track.FROM_CUSTOMER,
            n,
            n * 1024,
            n * 128,
            now - 5000 + n * 128,
            b"\0" * 2048,
            "1",
        )
        for n in range(10)
    ]
    region = streams["APP_REGION"]
    _publish(region, "callstream-audio", [CallStarted(contact, "arn:x", now - 6000), *chunks])
    _publish(
        region, "callstream-transcripts", [_segment(contact, Track.FROM_CUSTOMER, 0, "hi", False)]
    )
    assert main(["calls", "--json", "--since-minutes", "5"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (row,) = [r for r in rows if r["contact_id"] == contact]
    assert row["captured_ms"] == 1280 and row["transcribed_ms"] == 900
    assert row["transcript_lag_s"] == 0.4
    assert 3.0 <= row["capture_lag_s"] < 120
    assert main(["calls"]) == 0
    assert contact in capsys.readouterr().out


def test_deadletters_list_filters_and_redrive_puts_the_original_back_once(
    streams: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    region = streams["APP_REGION"]
    LeaseTable(aws.client("dynamodb", region), "callstream-leases").ensure_table()
    source = f"cli-redrive-{uuid.uuid4().hex[:8]}"  # not a stream the services read
    ensure_stream(aws.client("kinesis", region), source)
    sequence, reason = str(uuid.uuid4().int), f"bad bytes {uuid.uuid4()}"
    letter = DeadLetter(
        "recorder",
        source,
        "shardId-0",
        sequence,
        "pk",
        reason,
        "PoisonRecordError",
        int(time.time() * 1000),
        b"xyz",
    )
    _publish(region, "callstream-deadletters", [letter])
    assert main(["deadletters", "list", "--json", "--service", "recorder"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (row,) = [r for r in rows if r["sequence_number"] == sequence]
    assert row["reason"] == reason and row["bytes"] == 3
    assert main(["deadletters", "redrive", "--reason", reason, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] is True and dry["redriven"] == [row["id"]]
    assert main(["deadletters", "redrive", "--reason", reason]) == 0
    assert json.loads(capsys.readouterr().out)["redriven"] == [row["id"]]
    assert main(["deadletters", "redrive", "--reason", reason]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["redriven"] == [] and again["already_redriven"] == [row["id"]]
    kinesis = aws.client("kinesis", region)
    shard = kinesis.list_shards(StreamName=source)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=source, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    assert [r["Data"] for r in kinesis.get_records(ShardIterator=iterator)["Records"]] == [b"xyz"]
