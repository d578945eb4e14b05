"""AWS exceptions sorted into the project's three outcomes, where they enter.

Every adapter that calls boto3 turns what it catches into one of:

- `StoreUnavailable` (a `RetryableError`): throttling, 5xx, timeouts, dropped
  connections. Back off and try the same thing again; nothing is lost.
- `PoisonRecordError`: this request, built from this record, can never
  succeed (a row over DynamoDB's 400 KB, a malformed value, an object too
  large). The consumer loop dead-letters the record's bytes with the reason
  and carries on with the next.
- `ConfigurationFault`: no record can succeed until an operator acts (access
  denied, a missing table, stream or bucket, a disabled KMS key, bad
  credentials). The consumer loop stops loudly and the process exits non-zero.

    try:
        table.put_item(Item=item)
    except (ClientError, BotoCoreError) as e:
        raise classify(e, what=f"DynamoDB put to {name}") from e

Callers handle the codes they expect first (`ConditionalCheckFailedException`
where a condition is the point, `NoSuchKey` on a look-up).

Codes not in the tables below fall back on the HTTP status: 5xx, 429 and 408
retry; 401 and 403 are configuration (credentials or permissions); 404 is
configuration (something the service was told to use does not exist). Any
other 4xx is poison: AWS answered that this request is wrong, so retrying it
returns the same answer forever (the fault this module exists to end), and
stopping would let one malformed record stop every instance that takes its
shard over; a dead letter keeps the bytes, is counted (`dead_letters`) and
can be redriven once the cause is fixed. No status at all (a response that
never came) retries. See docs/errors.md.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from botocore import exceptions as bce
from botocore.exceptions import BotoCoreError, ClientError

from callstream.errors import (
    CallstreamError,
    ConfigurationFault,
    PoisonRecordError,
    StoreUnavailable,
)


class Outcome(Enum):
    """What the caller does with an error."""

    RETRY = "retry"
    POISON = "poison"
    STOP = "stop"


RETRY_CODES = frozenset(
    {
        # throttling (Kinesis, DynamoDB, S3, KMS, Comprehend, STS)
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "Throttling",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "LimitExceededException",
        "SlowDown",
        "BandwidthLimitExceeded",
        "KMSThrottlingException",
        "KMS.ThrottlingException",
        # the service's own trouble
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "InternalServerException",
        "KMSInternalException",
        "KMS.KMSInternalException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "OperationAborted",  # S3: a conflicting operation on the bucket is in progress
        "ResourceInUseException",  # Kinesis: the stream is UPDATING
        "TransactionConflict",
        "TransactionConflictException",
        "TransactionInProgressException",
        "IDPCommunicationError",
    }
)
POISON_CODES = frozenset(
    {
        "ValidationException",  # DynamoDB: item over 400 KB, bad attribute value
        "SerializationException",
        "InvalidArgumentException",  # Kinesis: a record it cannot take
        "ItemCollectionSizeLimitExceededException",
        "EntityTooLarge",  # S3
        "EntityTooSmall",
        "KeyTooLongError",
        "InvalidCiphertextException",
        "KMS.InvalidCiphertextException",
        "KMS.InvalidCiphertext",
        "TextSizeLimitExceededException",  # Comprehend
        "UnsupportedLanguageException",
    }
)
STOP_CODES = frozenset(
    {
        # credentials and permissions
        "AccessDenied",
        "AccessDeniedException",
        "AllAccessDisabled",
        "AccountProblem",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "InvalidClientTokenId",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "NotAuthorized",
        "AuthFailure",
        "OptInRequired",
        "SubscriptionRequiredException",
        "RequestExpired",
        "RequestTimeTooSkewed",
        # what the service was told to use does not exist or is elsewhere
        "ResourceNotFoundException",
        "TableNotFoundException",
        "NoSuchBucket",
        "InvalidBucketName",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",  # S3: signed for another region
        # the KMS key behind a stream, table or bucket
        "KMSAccessDeniedException",
        "KMSDisabledException",
        "KMSNotFoundException",
        "KMSInvalidStateException",
        "KMSOptInRequired",
        "KMS.AccessDeniedException",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMS.KMSInvalidStateException",
        "KMS.InvalidStateException",
        "KMS.OptInRequired",
    }
)
# BotoCoreErrors that no retry mends: the client cannot even be set up or sign.
_STOP_BOTOCORE: tuple[type[BotoCoreError], ...] = (
    bce.NoCredentialsError,
    bce.PartialCredentialsError,
    bce.NoRegionError,
    bce.UnknownServiceError,
    bce.ProfileNotFound,
    bce.InvalidRegionError,
    bce.InvalidConfigError,
    bce.DataNotFoundError,
)
# Parameters botocore refuses to send: the request built from this record is wrong.
_POISON_BOTOCORE: tuple[type[BotoCoreError], ...] = (bce.ParamValidationError,)


def error_code(error: ClientError) -> str:
    """The AWS error code of a ClientError ('' if the response had none)."""
    return str(error.response.get("Error", {}).get("Code", ""))


def http_status(error: ClientError) -> int | None:
    """The HTTP status of a ClientError's response, if it had one."""
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status else None


def outcome_of_code(code: str, status: int | None = None) -> Outcome:
    """The outcome of an AWS error code, else of its HTTP status (see the module docstring)."""
    for codes, outcome in (
        (RETRY_CODES, Outcome.RETRY),
        (POISON_CODES, Outcome.POISON),
        (STOP_CODES, Outcome.STOP),
    ):
        if code in codes:
            return outcome
    if status is None or status >= 500 or status in (408, 429):
        return Outcome.RETRY
    if status in (401, 403, 404):
        return Outcome.STOP
    if 400 <= status < 500:
        return Outcome.POISON
    return Outcome.RETRY


def outcome(error: BaseException) -> Outcome:
    """The outcome of a botocore (or boto3-wrapped) exception."""
    cause = _aws_cause(error)
    if isinstance(cause, ClientError):
        return outcome_of_code(error_code(cause), http_status(cause))
    if isinstance(cause, _STOP_BOTOCORE):
        return Outcome.STOP
    if isinstance(cause, _POISON_BOTOCORE):
        return Outcome.POISON
    return Outcome.RETRY  # connection and read timeouts, dropped connections, ...


def classify(error: BaseException, *, what: str) -> CallstreamError:
    """The project's exception for an AWS one; `what` says what was being done.

    Takes `ClientError`, `BotoCoreError` or a boto3 error wrapping one (the
    `S3UploadFailedError` of `upload_file`). Raise the result `from` the error.
    """
    message = f"{what} failed: {describe(error)}"
    chosen = outcome(error)
    if chosen is Outcome.POISON:
        return PoisonRecordError(message)
    if chosen is Outcome.STOP:
        return ConfigurationFault(message)
    return StoreUnavailable(message)


def describe(error: BaseException) -> str:
    """`Code (HTTP status): message` of a ClientError; the text of anything else."""
    cause = _aws_cause(error)
    if isinstance(cause, ClientError):
        status = http_status(cause)
        text = cause.response.get("Error", {}).get("Message", "") or str(cause)
        return f"{error_code(cause) or 'no error code'} (HTTP {status or '?'}): {text}"
    return f"{type(cause).__name__}: {cause}"


def _aws_cause(error: BaseException) -> BaseException:
    """The botocore exception itself, or the one a boto3 error was raised while handling."""
    seen: Any = error
    for _ in range(5):  # boto3 wraps once; a short walk is enough
        if isinstance(seen, (ClientError, BotoCoreError)) or seen is None:
            break
        seen = seen.__cause__ or seen.__context__
    return seen if isinstance(seen, (ClientError, BotoCoreError)) else error
