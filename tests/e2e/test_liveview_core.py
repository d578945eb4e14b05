"""The live view's board without streams or a browser: partials, finals, recordings."""

from __future__ import annotations

from typing import Any

from callstream.events import (
    CallEnded,
    CallStarted,
    EndReason,
    RecordingStored,
    Track,
    TranscriptSegmentProduced,
)
from services.liveview.core import CallBoard


def _segment(
    text: str, partial: bool, start: int = 1000, track: Track = Track.FROM_CUSTOMER
) -> Any:
    return TranscriptSegmentProduced(
        "c", track, f"c:{track.value}:{start}", start, start + 500, text, partial
    )


def test_a_final_replaces_its_partials_and_a_late_partial_does_not_replace_the_final() -> None:
    board = CallBoard()
    board.apply(CallStarted("c", "arn", 5))
    board.apply(_segment("hel", True))
    board.apply(_segment("hello", True))
    board.apply(_segment("Hello there.", False))
    board.apply(_segment("hello th", True))
    (line,) = board.snapshot()["calls"][0]["lines"]
    assert (line["text"], line["partial"], line["speaker"]) == ("Hello there.", False, "customer")


def test_lines_are_in_time_order_and_the_version_moves_on_each_change() -> None:
    board = CallBoard()
    board.apply(_segment("second", False, start=2000, track=Track.TO_CUSTOMER))
    first = board.version
    board.apply(_segment("first", False, start=1000))
    assert board.version > first
    lines = board.snapshot()["calls"][0]["lines"]
    assert [(x["speaker"], x["text"]) for x in lines] == [
        ("customer", "first"),
        ("agent", "second"),
    ]


def test_recordings_appear_when_announced_and_only_those_are_served() -> None:
    board = CallBoard()
    board.apply(CallEnded("c", EndReason.END_OF_STREAM, 10))
    assert board.snapshot()["calls"][0]["recordings"] == {}
    before = board.version
    board.apply(_stored("c", "recordings/c.wav", (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)))
    board.apply(_stored("c", "recordings/c_AUDIO_TO_CUSTOMER.wav", (Track.TO_CUSTOMER,)))
    assert board.version == before + 2
    assert board.snapshot()["calls"][0]["recordings"] == {
        "agent": "recordings/c_AUDIO_TO_CUSTOMER.wav",
        "customer / agent": "recordings/c.wav",
    }
    assert board.bucket_of("recordings/c.wav") == "rec-bucket"
    assert board.bucket_of("recordings/other.wav") is None


def _stored(contact: str, key: str, tracks: tuple[Track, ...]) -> RecordingStored:
    return RecordingStored(
        contact_id=contact,
        s3_uri=f"s3://rec-bucket/{key}",
        bucket="rec-bucket",
        key=key,
        format="stereo" if len(tracks) == 2 else "per-track",
        channel_tracks=tracks,
        channels=len(tracks),
        sample_rate=8000,
        duration_ms=1000,
        byte_count=44 + 16000 * len(tracks),
        checksum_algorithm="CRC32",
        checksum="AAAAAA==",
    )


def test_active_calls_come_first_and_the_board_keeps_at_most_max_calls() -> None:
    board = CallBoard(max_calls=2)
    board.apply(CallStarted("old", "arn", 1))
    board.apply(CallEnded("old", EndReason.END_OF_STREAM, 2))
    board.apply(CallStarted("a", "arn", 3))
    board.apply(CallStarted("b", "arn", 4))
    assert [c["contact_id"] for c in board.snapshot()["calls"]] == ["b", "a"]
