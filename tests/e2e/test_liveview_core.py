"""The live view's board without streams or a browser: partials, finals, recordings."""

from __future__ import annotations

from typing import Any

from callstream.events import CallEnded, CallStarted, EndReason, Track, TranscriptSegmentProduced
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


def test_an_ended_call_waits_for_its_recordings_and_only_those_are_served() -> None:
    board = CallBoard()
    board.apply(CallEnded("c", EndReason.END_OF_STREAM, 10))
    assert board.awaiting_recordings() == ["c"]
    board.add_recording("c", "customer", "recordings/c_AUDIO_FROM_CUSTOMER.wav")
    board.add_recording("c", "agent", "recordings/c_AUDIO_TO_CUSTOMER.wav")
    assert board.awaiting_recordings() == []
    assert board.knows_recording("recordings/c_AUDIO_TO_CUSTOMER.wav")
    assert not board.knows_recording("recordings/other.wav")


def test_active_calls_come_first_and_the_board_keeps_at_most_max_calls() -> None:
    board = CallBoard(max_calls=2)
    board.apply(CallStarted("old", "arn", 1))
    board.apply(CallEnded("old", EndReason.END_OF_STREAM, 2))
    board.apply(CallStarted("a", "arn", 3))
    board.apply(CallStarted("b", "arn", 4))
    assert [c["contact_id"] for c in board.snapshot()["calls"]] == ["b", "a"]
