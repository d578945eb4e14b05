"""Error types shared by every service.

Two families matter at the edge: `RetryableError` (back off and try again;
nothing is lost) and `PoisonRecordError` (this record can never be processed:
dead-letter its bytes with the reason and move on).
"""

from __future__ import annotations


class CallstreamError(Exception):
    """Base class of the project's own errors."""


class ConfigError(CallstreamError):
    """A setting is missing or malformed; the message names the variable."""


class RetryableError(CallstreamError):
    """A transient failure (throttling, timeout, unavailable): retry with backoff."""


class StoreUnavailable(RetryableError):
    """A store (S3, DynamoDB, Kinesis) did not accept a request this time."""


class PoisonRecordError(CallstreamError):
    """A record that can never be processed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidTriggerEvent(CallstreamError):
    """A trigger event that is not a usable call start; the message says what is wrong."""


class MediaStreamError(CallstreamError):
    """A Kinesis Video stream could not be read (missing, unreadable, no audio)."""
