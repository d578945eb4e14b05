"""The `callstream` command line without AWS: help, usage errors, the pure helpers."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from callstream.cli import ContactGate, TrackFiles, _parser, _wav_tracks, format_segment, main
from callstream.events import Track, TranscriptSegmentProduced

COMMANDS = [
    ["local", "up"],
    ["local", "down"],
    ["demo"],
    ["trigger"],
    ["replay"],
    ["tail"],
    ["calls"],
    ["deadletters", "list"],
    ["deadletters", "redrive"],
    ["kvs", "dump"],
    ["liveview"],
]


@pytest.mark.parametrize("command", [[], ["local"], ["deadletters"], ["kvs"], *COMMANDS])
def test_every_command_has_help_and_exits_0(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*command, "--help"]) == 0
    assert "usage: callstream" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["tail"], ["kvs", "dump"], ["replay"], ["calls", "--since-minutes", "x"]],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_kvs_dump_start_options_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kvs", "dump", "s", "--fragment", "1", "--timestamp", "0"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_local_down_without_an_emulator_fails_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["local", "down", "--state-file", str(tmp_path / "none.json")]) == 1
    assert "no emulator state file" in capsys.readouterr().err


def test_local_down_removes_a_stale_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "local.json"
    state.write_text(json.dumps({"pid": 2**22 + 17, "env": {}}))
    assert main(["local", "down", "--state-file", str(state)]) == 1
    assert "not running" in capsys.readouterr().err
    assert not state.exists()


def test_local_option_without_a_running_emulator_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calls", "--local", "--state-file", str(tmp_path / "x.json")]) == 1
    assert "callstream local up" in capsys.readouterr().err


def test_replay_refuses_other_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "call.mp3"
    path.write_bytes(b"ID3")
    assert main(["replay", str(path)]) == 1
    assert "expected a .wav or .mkv" in capsys.readouterr().err


def test_trigger_refuses_an_invalid_event_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["trigger", json.dumps({"streamARN": "nope"})]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "refused"


def _wav(path: Path, channels: int, frames: bytes, rate: int = 8000) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(frames)
    return path


def test_a_stereo_wav_is_customer_left_and_agent_right(tmp_path: Path) -> None:
    frames = b"\x01\x00\x02\x00" * 4
    customer, agent = _wav_tracks(_wav(tmp_path / "s.wav", 2, frames), None)
    assert customer == b"\x01\x00" * 4 and agent == b"\x02\x00" * 4


def test_a_mono_wav_is_the_customer_with_a_silent_agent(tmp_path: Path) -> None:
    customer, agent = _wav_tracks(_wav(tmp_path / "m.wav", 1, b"\x05\x00" * 8), None)
    assert customer == b"\x05\x00" * 8 and agent == b"\0" * 16


def test_a_wav_at_another_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="8 kHz"):
        _wav_tracks(_wav(tmp_path / "w.wav", 1, b"\0\0" * 8, rate=16000), None)


def test_segments_print_with_time_speaker_and_partial_mark() -> None:
    segment = TranscriptSegmentProduced(
        "c", Track.TO_CUSTOMER, "c:x:61500", 61500, 62000, "hi", True
    )
    assert format_segment(segment) == "[01:01.5]    agent~ hi"


def test_contact_gate_passes_only_the_contact_and_ends_at_the_next() -> None:
    gate = ContactGate("b")
    gate.tags((("ContactId", "a"),))
    assert not gate.open()
    gate.tags((("AWS_KINESISVIDEO_FRAGMENT_NUMBER", "1"), ("ContactId", "b")))
    assert gate.open() and gate.seen
    gate.tags((("ContactId", "c"),))
    assert gate.over and not gate.open()


def test_track_files_write_one_wav_per_wanted_track(tmp_path: Path) -> None:
    files = TrackFiles(tmp_path, "call", "wav", ("AUDIO_FROM_CUSTOMER",))
    files.write("AUDIO_FROM_CUSTOMER", b"\x01\x00" * 100)
    files.write("AUDIO_TO_CUSTOMER", b"\x02\x00" * 100)
    (path,) = files.close()
    with wave.open(str(path), "rb") as wav:
        assert wav.getnframes() == 100 and wav.readframes(100) == b"\x01\x00" * 100


def test_the_parser_names_every_command() -> None:
    text = _parser().format_help()
    for name in ("local", "demo", "replay", "tail", "calls", "deadletters", "kvs"):
        assert name in text
