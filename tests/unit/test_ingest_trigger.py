"""The trigger's file mode: `inputFileName` becomes a call on an s3:// URI."""

from __future__ import annotations

import pytest

from callstream.errors import InvalidTriggerEvent
from services.ingest.trigger import parse_trigger


def test_input_file_name_becomes_an_s3_uri_under_the_input_prefix() -> None:
    call = parse_trigger(
        {
            "inputFileName": "calls/c1.wav",
            "connectContactId": "c-1",
            "transcriptionEnabled": "true",
        },
        now_ms=7,
        input_bucket="recordings",
        input_prefix="input/",
    )
    assert call.stream_arn == "s3://recordings/input/calls/c1.wav"
    assert call.contact_id == "c-1" and call.start_fragment_number is None
    assert call.requested_at_ms == 7


def test_without_a_contact_id_the_same_file_always_names_the_same_call() -> None:
    event = {"inputFileName": "c1.wav"}
    first = parse_trigger(event, input_bucket="b", input_prefix="p/")
    again = parse_trigger(event, input_bucket="b", input_prefix="p/")
    other = parse_trigger({"inputFileName": "c2.wav"}, input_bucket="b", input_prefix="p/")
    assert first.contact_id == again.contact_id != other.contact_id


def test_a_stream_arn_wins_over_an_input_file() -> None:
    arn = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/s/1700000000000"
    call = parse_trigger(
        {"streamARN": arn, "inputFileName": "x.wav", "connectContactId": "c-1"},
        input_bucket="b",
    )
    assert call.stream_arn == arn


@pytest.mark.parametrize("name", ["../secret.wav", "a/../../b.wav", "/abs.wav", "", 5])
def test_input_file_names_that_escape_the_prefix_are_refused(name: object) -> None:
    event = {"inputFileName": name, "connectContactId": "c-1"}
    with pytest.raises(InvalidTriggerEvent):
        parse_trigger(event, input_bucket="b", input_prefix="p/")


def test_file_mode_without_a_bucket_says_which_setting_is_missing() -> None:
    with pytest.raises(InvalidTriggerEvent, match="RECORDINGS_BUCKET_NAME"):
        parse_trigger({"inputFileName": "c1.wav", "connectContactId": "c-1"})
