"""The trigger accepts the reference and the Connect contact-flow events; says what is wrong."""

from __future__ import annotations

import pytest

from callstream.errors import InvalidTriggerEvent
from services.ingest.trigger import parse_trigger

ARN = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/connect-contact-abc/1700000000000"


def test_reads_the_reference_lambda_event() -> None:
    call = parse_trigger(
        {
            "streamARN": ARN,
            "startFragmentNum": "91343852333181551234925834077012571618243808844",
            "connectContactId": "87718f4a-d2ed-476a-ad11-f496ab09b3f8",
            "transcriptionEnabled": "false",
            "languageCode": "es-US",
        },
        now_ms=5,
    )
    assert call.stream_arn == ARN and call.contact_id.startswith("87718f4a")
    assert call.start_fragment_number == "91343852333181551234925834077012571618243808844"
    assert call.transcription_enabled is False and call.language_code == "es-US"
    assert call.requested_at_ms == 5


def test_reads_the_connect_contact_flow_event() -> None:
    event = {
        "Name": "ContactFlowEvent",
        "Details": {
            "ContactData": {
                "ContactId": "c-42",
                "InstanceARN": "arn:aws:connect:us-east-1:123456789012:instance/inst-1",
                "Attributes": {"transcribeCall": "true", "languageCode": "fr-FR"},
                "MediaStreams": {
                    "Customer": {"Audio": {"StreamARN": ARN, "StartFragmentNumber": "123"}}
                },
            }
        },
    }
    call = parse_trigger(event)
    assert (call.contact_id, call.start_fragment_number, call.instance_id) == (
        "c-42",
        "123",
        "inst-1",
    )
    assert call.transcription_enabled and call.language_code == "en-US"
    assert call.attributes["transcribeCall"] == "true"


@pytest.mark.parametrize(
    "event,message",
    [
        ([], "must be a JSON object"),
        ({"streamARN": ARN}, "no contact id"),
        ({"connectContactId": "c", "streamARN": "arn:aws:s3:::bucket"}, "stream ARN is malformed"),
        ({"connectContactId": "c", "streamARN": ARN, "startFragmentNum": "12ab"}, "digits"),
        (
            {"connectContactId": "c", "streamARN": ARN, "transcriptionEnabled": "maybe"},
            "true or false",
        ),
        ({"Details": {}}, "Details.ContactData"),
    ],
)
def test_malformed_events_are_refused_with_the_reason(event: object, message: str) -> None:
    with pytest.raises(InvalidTriggerEvent, match=message):
        parse_trigger(event)
