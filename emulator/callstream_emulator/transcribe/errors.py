"""The service's exceptions: their HTTP statuses, and how an engine failure looks as one."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from callstream.asr.port import FatalSpeechError, RetryableSpeechError

# The HTTP status the service answers with when it refuses a stream at start.
EXCEPTION_STATUS: Mapping[str, int] = MappingProxyType(
    {
        "BadRequestException": 400,
        "SerializationException": 400,
        "UnrecognizedClientException": 403,
        "ConflictException": 409,
        "LimitExceededException": 429,
        "InternalFailureException": 500,
        "ServiceUnavailableException": 503,
    }
)


class ServiceError(Exception):
    """A refusal in the service's own terms: exception name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def service_error_for(error: Exception) -> ServiceError:
    """How an engine failure looks to a client of the service."""
    if isinstance(error, RetryableSpeechError):
        return ServiceError("ServiceUnavailableException", str(error))
    if isinstance(error, FatalSpeechError | ValueError):
        return ServiceError("BadRequestException", str(error))
    return ServiceError("InternalFailureException", f"{type(error).__name__}: {error}")
