"""deploy/contact-flow.json: a valid flow that streams, sets attributes, invokes the trigger.

The flow's attributes, put into the event Connect sends the Lambda, are parsed by
the trigger into the CallStarted the flow intends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.ingest.trigger import parse_trigger

FLOW = Path(__file__).resolve().parents[2] / "deploy" / "contact-flow.json"


@pytest.fixture(scope="module")
def flow() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(FLOW.read_text())
    return loaded


def _actions(flow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {action["Identifier"]: action for action in flow["Actions"]}


def _next(action: dict[str, Any]) -> list[str]:
    transitions = action["Transitions"]
    targets = [transitions["NextAction"]] if "NextAction" in transitions else []
    return targets + [e["NextAction"] for e in transitions.get("Errors", [])]


def test_every_transition_goes_to_an_action_and_every_action_is_reachable(
    flow: dict[str, Any],
) -> None:
    actions = _actions(flow)
    seen, todo = set(), [flow["StartAction"]]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in actions, f"transition to missing action {name}"
        todo.extend(_next(actions[name]))
    assert seen == set(actions)


def test_streaming_starts_then_attributes_are_set_then_the_trigger_is_invoked(
    flow: dict[str, Any],
) -> None:
    actions = _actions(flow)
    path, name = [], flow["StartAction"]
    while actions[name]["Transitions"].get("NextAction") and len(path) < 20:
        path.append(actions[name]["Type"])
        name = actions[name]["Transitions"]["NextAction"]
    streaming = path.index("UpdateContactMediaStreamingBehavior")
    assert streaming < path.index("UpdateContactAttributes") < path.index("InvokeLambdaFunction")
    start = actions["start-media-streaming"]["Parameters"]
    assert start["MediaStreamingState"] == "Enabled"
    assert start["Participants"][0]["MediaDirections"] == ["From", "To"]
    invoke = actions["invoke-callstream-trigger"]["Parameters"]
    assert int(invoke["InvocationTimeLimitSeconds"]) <= 8
    assert invoke["LambdaFunctionARN"] == "REPLACE_WITH_TRIGGER_FUNCTION_ARN"


def test_the_trigger_reads_the_flows_attributes(flow: dict[str, Any]) -> None:
    attributes = _actions(flow)["set-callstream-attributes"]["Parameters"]["Attributes"]
    arn = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/cs-connect-x-contact-1/1700000000000"
    event = {
        "Name": "ContactFlowEvent",
        "Details": {
            "ContactData": {
                "ContactId": "5ca0cd57-1e5a-4f1b-a0a4-7b1d1c0d2e3f",
                "InstanceARN": "arn:aws:connect:us-east-1:123456789012:instance/abcd",
                "Attributes": attributes,
                "MediaStreams": {
                    "Customer": {
                        "Audio": {"StreamARN": arn, "StartFragmentNumber": "91343852333181432"}
                    }
                },
            },
            "Parameters": {},
        },
    }
    call = parse_trigger(event, now_ms=1)
    assert call.transcription_enabled is True and call.language_code == "en-US"
    assert call.stream_arn == arn and call.instance_id == "abcd"
