"""Trigger: turn a call-start event into a validated `CallStarted`.

Accepts both shapes users have today:
- the reference Lambda's event `{streamARN, startFragmentNum, connectContactId,
  transcriptionEnabled, languageCode?}`;
- the raw Amazon Connect contact-flow event (`Details.ContactData...`), whose
  `MediaStreams.Customer.Audio` carries the stream and start fragment and whose
  `Attributes.transcribeCall` / `languageCode` switch transcription and language.

File mode, as the reference: an event with `inputFileName` (and no stream)
asks for a recording in S3 to be transcribed as if it were a call. The
object is `s3://<input_bucket>/<input_prefix><inputFileName>` (the handler
passes RECORDINGS_BUCKET_NAME and INPUT_KEY_PREFIX); that URI goes in
CallStarted's `stream_arn`, as its schema allows. Without a
`connectContactId` the contact id is derived from the URI, so a repeated
trigger names the same call.

Pure: parsing and validation only. `lambda_handler` is the thin AWS edge.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from callstream.errors import InvalidTriggerEvent
from callstream.events import CallStarted

STREAM_ARN = re.compile(
    r"^arn:aws[a-z-]*:kinesisvideo:[a-z0-9-]+:\d{12}:stream/[A-Za-z0-9_.-]{1,256}/\d{10,}$"
)
FRAGMENT_NUMBER = re.compile(r"^\d{1,128}$")
CONTACT_ID = re.compile(r"^[A-Za-z0-9-]{1,256}$")
INPUT_FILE_NAME = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[A-Za-z0-9!_.*'()/ -]{1,900}$")
SUPPORTED_LANGUAGES = ("en-US", "es-US")


def parse_trigger(
    event: Any,
    now_ms: int | None = None,
    *,
    input_bucket: str | None = None,
    input_prefix: str = "",
) -> CallStarted:
    """Validate a trigger event of either shape; raise InvalidTriggerEvent saying what is wrong."""
    if not isinstance(event, dict):
        raise InvalidTriggerEvent(
            f"trigger event must be a JSON object, got {type(event).__name__}"
        )
    fields = _connect_fields(event) if "Details" in event else _reference_fields(event)
    if event.get("inputFileName") not in (None, "") and not fields.get("stream ARN"):
        stream_arn = _input_uri(event["inputFileName"], input_bucket, input_prefix)
        fields.setdefault("contact id", None)
        if not fields["contact id"]:
            fields["contact id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, stream_arn))
    else:
        stream_arn = _require(fields, "stream ARN", STREAM_ARN)
    contact_id = _require(fields, "contact id", CONTACT_ID)
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


def _input_uri(name: Any, bucket: str | None, prefix: str) -> str:
    if not isinstance(name, str) or not INPUT_FILE_NAME.match(name):
        raise InvalidTriggerEvent(
            f"inputFileName must be a relative S3 key without '..', got {name!r}"
        )
    if not bucket:
        raise InvalidTriggerEvent("inputFileName needs RECORDINGS_BUCKET_NAME to be set")
    return f"s3://{bucket}/{prefix}{name}"


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
    return value if value in SUPPORTED_LANGUAGES else SUPPORTED_LANGUAGES[0]


def _instance_of(instance_arn: Any) -> str | None:
    if isinstance(instance_arn, str) and "/" in instance_arn:
        return instance_arn.rsplit("/", 1)[1]
    return None
