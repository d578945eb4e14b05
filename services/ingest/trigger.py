"""Trigger: turn a call-start event into a validated `CallStarted`.

Accepts both shapes users have today:
- the reference Lambda's event `{streamARN, startFragmentNum, connectContactId,
  transcriptionEnabled, languageCode?}`;
- the raw Amazon Connect contact-flow event (`Details.ContactData...`), whose
  `MediaStreams.Customer.Audio` carries the stream and start fragment and whose
  `Attributes.transcribeCall` / `languageCode` switch transcription and language.

Pure: parsing and validation only. `lambda_handler` is the thin AWS edge.
"""

from __future__ import annotations

import re
import time
from typing import Any

from callstream.errors import InvalidTriggerEvent
from callstream.events import CallStarted

STREAM_ARN = re.compile(
    r"^arn:aws[a-z-]*:kinesisvideo:[a-z0-9-]+:\d{12}:stream/[A-Za-z0-9_.-]{1,256}/\d{10,}$"
)
FRAGMENT_NUMBER = re.compile(r"^\d{1,128}$")
CONTACT_ID = re.compile(r"^[A-Za-z0-9-]{1,256}$")
SUPPORTED_LANGUAGES = ("en-US", "es-US")


def parse_trigger(event: Any, now_ms: int | None = None) -> CallStarted:
    """Validate a trigger event of either shape; raise InvalidTriggerEvent saying what is wrong."""
    if not isinstance(event, dict):
        raise InvalidTriggerEvent(
            f"trigger event must be a JSON object, got {type(event).__name__}"
        )
    fields = _connect_fields(event) if "Details" in event else _reference_fields(event)
    contact_id = _require(fields, "contact id", CONTACT_ID)
    stream_arn = _require(fields, "stream ARN", STREAM_ARN)
    fragment = fields.get("start fragment number")
    if fragment not in (None, "") and not FRAGMENT_NUMBER.match(str(fragment)):
        raise InvalidTriggerEvent(f"start fragment number must be digits, got {fragment!r}")
    return CallStarted(
        contact_id=contact_id,
        stream_arn=stream_arn,
        start_fragment_number=str(fragment) if fragment else None,
        transcription_enabled=_flag(fields.get("transcription enabled"), default=True),
        language_code=_language(fields.get("language")),
        instance_id=fields.get("instance id"),
        requested_at_ms=now_ms if now_ms is not None else int(time.time() * 1000),
        attributes={k: str(v) for k, v in (fields.get("attributes") or {}).items()},
    )


def _reference_fields(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "contact id": event.get("connectContactId"),
        "stream ARN": event.get("streamARN"),
        "start fragment number": event.get("startFragmentNum"),
        "transcription enabled": event.get("transcriptionEnabled"),
        "language": event.get("languageCode"),
        "instance id": event.get("instanceId"),
    }


def _connect_fields(event: dict[str, Any]) -> dict[str, Any]:
    data = (event.get("Details") or {}).get("ContactData")
    if not isinstance(data, dict):
        raise InvalidTriggerEvent("Connect event has no Details.ContactData object")
    audio = ((data.get("MediaStreams") or {}).get("Customer") or {}).get("Audio") or {}
    attributes = data.get("Attributes") or {}
    return {
        "contact id": data.get("ContactId"),
        "stream ARN": audio.get("StreamARN"),
        "start fragment number": audio.get("StartFragmentNumber"),
        "transcription enabled": attributes.get("transcribeCall"),
        "language": attributes.get("languageCode"),
        "instance id": _instance_of(data.get("InstanceARN")),
        "attributes": attributes,
    }


def _require(fields: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = fields.get(name)
    if value is None or value == "":
        raise InvalidTriggerEvent(f"trigger event has no {name}")
    if not isinstance(value, str) or not pattern.match(value):
        raise InvalidTriggerEvent(f"{name} is malformed: {value!r}")
    return value


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InvalidTriggerEvent(f"transcription flag must be true or false, got {value!r}")


def _language(value: Any) -> str:
    # The reference: the languageCode attribute picks es-US, anything else is en-US.
    return "es-US" if value == "es-US" else "en-US"


def _instance_of(instance_arn: Any) -> str | None:
    if isinstance(instance_arn, str) and "/" in instance_arn:
        return instance_arn.rsplit("/", 1)[1]
    return None
