"""Error types shared by every service.

Three outcomes matter at the edge: `RetryableError` (back off and try again;
nothing is lost), `PoisonRecordError` (this record can never be processed:
dead-letter its bytes with the reason and move on) and `ConfigurationFault`
(no record can be processed until an operator fixes something: stop loudly).
`callstream.awserrors` sorts AWS exceptions into them; see docs/errors.md.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from callstream.bus.ports import Record


class CallstreamError(Exception):
    """Base class of the project's own errors."""

    # Of a failed publish: which of its items the stream stored, in the order given
    # (see `partly_published`); None when the error does not say.
    stored: tuple[bool, ...] | None = None


def partly_published(error: CallstreamError, stored: Sequence[bool]) -> CallstreamError:
    """`error` as one caller's publish ended: a copy whose `stored` says which of its items
    the stream took, so that the caller sends only the others again (no repeats)."""
    mine = copy.copy(error)
    mine.stored = tuple(stored)
    return mine


def stored_of(error: BaseException, count: int) -> tuple[bool, ...]:
    """Which of a failed publish's `count` items were stored; none if the error does not say."""
    stored = getattr(error, "stored", None)
    if isinstance(stored, tuple) and len(stored) == count:
        return stored
    return (False,) * count


class ConfigError(CallstreamError):
    """A setting is missing or malformed; the message names the variable."""


class RetryableError(CallstreamError):
    """A transient failure (throttling, timeout, unavailable): retry with backoff."""


class StoreUnavailable(RetryableError):
    """A store (S3, DynamoDB, Kinesis) did not accept a request this time."""


class PoisonRecordError(CallstreamError):
    """A record that can never be processed; `reason` says why.

    `record` names the record when it is not the one being handled (a handler
    that buffers effects finds a bad row only when it flushes); the consumer
    loop dead-letters that one instead.
    """

    def __init__(self, reason: str, record: Record | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.record = record


class ConfigurationFault(CallstreamError):
    """No record can succeed until an operator acts: access denied, a missing table,
    stream or bucket, a disabled KMS key, bad credentials. The loop stops loudly
    (no checkpoint past the record, no dead letter) and the process exits non-zero."""


class UnknownWriterSchema(RetryableError, PoisonRecordError):
    """A record written with a schema version this process does not have.

    Not the record's fault: a producer was upgraded (or unpinned) before this
    consumer. The consumer loop must not dead-letter it; it pauses the shard
    and retries (see `callstream.runtime`). It is also a `PoisonRecordError`
    so that read-only tools (tail, read-back) skip it as undecodable, as before.
    """

    def __init__(self, fingerprint: str) -> None:
        super().__init__(
            f"unknown schema fingerprint {fingerprint}: written with a schema version "
            "this consumer does not have; upgrade this consumer or pin producers "
            "(CALLSTREAM_WRITER_SCHEMAS)"
        )
        self.fingerprint = fingerprint


class InvalidTriggerEvent(CallstreamError):
    """A trigger event that is not a usable call start; the message says what is wrong."""


class MediaStreamError(CallstreamError):
    """A Kinesis Video stream could not be read (missing, unreadable, no audio)."""
