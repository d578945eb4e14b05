"""A stream's start request: its `x-amzn-transcribe-*` parameters, checked as the service does."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from callstream.audio import SAMPLE_RATE
from callstream_emulator.transcribe.asgi import Scope
from callstream_emulator.transcribe.errors import ServiceError

STREAM_PATH = "/stream-transcription"
PARAM_PREFIX = "x-amzn-transcribe-"


@dataclass(frozen=True)
class StartParams:
    """What a valid start request asked for, and the parameters to echo back."""

    language_code: str
    sample_rate: int
    session_id: str
    echoed: tuple[tuple[str, str], ...]
    channels: int = 1


def start_params(scope: Scope) -> StartParams:
    """Validate a start request the way the service would; raise `ServiceError` if not."""
    if scope["method"] != "POST" or scope["path"] != STREAM_PATH:
        raise ServiceError("BadRequestException", f"no operation at {scope['path']}")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if "authorization" not in headers:
        raise ServiceError("UnrecognizedClientException", "the request is not signed")
    language = headers.get(PARAM_PREFIX + "language-code", "")
    if not language:
        raise ServiceError("BadRequestException", "a language code is required")
    rate = headers.get(PARAM_PREFIX + "sample-rate", "")
    if rate != str(SAMPLE_RATE):
        raise ServiceError(
            "BadRequestException", f"sample rate must be {SAMPLE_RATE} Hz here, got {rate!r}"
        )
    encoding = headers.get(PARAM_PREFIX + "media-encoding", "")
    if encoding != "pcm":
        raise ServiceError("BadRequestException", f"media encoding must be pcm, got {encoding!r}")
    channels = _channels(headers)
    session_id = headers.get(PARAM_PREFIX + "session-id") or str(uuid.uuid4())
    echoed = {k: v for k, v in headers.items() if k.startswith(PARAM_PREFIX)}
    echoed[PARAM_PREFIX + "session-id"] = session_id
    return StartParams(language, SAMPLE_RATE, session_id, tuple(echoed.items()), channels)


def _channels(headers: Mapping[str, str]) -> int:
    """1, or 2 with channel identification; the service's own rules otherwise."""
    identify = headers.get(PARAM_PREFIX + "enable-channel-identification", "false")
    count = headers.get(PARAM_PREFIX + "number-of-channels")
    if identify.lower() != "true":
        if count is not None:
            raise ServiceError(
                "BadRequestException", "NumberOfChannels needs EnableChannelIdentification"
            )
        return 1
    if count != "2":
        raise ServiceError(
            "BadRequestException",
            f"channel identification needs NumberOfChannels 2, got {count!r}",
        )
    if headers.get(PARAM_PREFIX + "show-speaker-label", "false").lower() == "true":
        raise ServiceError(
            "BadRequestException", "set ShowSpeakerLabel or EnableChannelIdentification, not both"
        )
    return 2
