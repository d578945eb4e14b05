"""AWS errors are classified where they enter: retry, dead-letter the record, or stop the loop.

Every code is a real `botocore` `ClientError` (or `BotoCoreError`), sorted by
`callstream.awserrors.classify` and raised by a handler inside a `ServiceLoop`
over the in-memory bus, so each row checks what the loop then does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore import exceptions as bce
from botocore.exceptions import ClientError

from callstream.awserrors import Outcome, classify, outcome
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record
from callstream.contract import default_contract
from callstream.errors import (
    ConfigurationFault,
    PoisonRecordError,
    RetryableError,
    StoreUnavailable,
)
from callstream.events import CallStarted, DeadLetter, Event
from callstream.metrics import CONFIGURATION_FAULTS, DEAD_LETTERS, ERRORS, Metrics
from callstream.runtime import ServiceLoop

SHARD = "shardId-000000000000"


def client_error(code: str, status: int | None = 400, operation: str = "PutItem") -> ClientError:
    response: dict[str, Any] = {"Error": {"Code": code, "Message": f"{code} happened"}}
    if status is not None:
        response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, operation)  # type: ignore[arg-type]


RETRY, DEAD_LETTER, STOP = "retry", "dead letter", "stop"
CASES: list[tuple[str, int | None, str]] = [
    # throttling and the services' own trouble: back off and retry
    ("ProvisionedThroughputExceededException", 400, RETRY),  # Kinesis, DynamoDB
    ("ThrottlingException", 400, RETRY),
    ("RequestLimitExceeded", 400, RETRY),  # DynamoDB account limit
    ("LimitExceededException", 400, RETRY),
    ("KMSThrottlingException", 400, RETRY),
    ("SlowDown", 503, RETRY),  # S3
    ("InternalServerError", 500, RETRY),
    ("InternalFailure", 500, RETRY),
    ("InternalError", 500, RETRY),
    ("ServiceUnavailable", 503, RETRY),
    ("RequestTimeout", 400, RETRY),  # S3 answers it with 400
    ("TransactionConflict", 400, RETRY),
    ("TransactionConflictException", 400, RETRY),
    ("ResourceInUseException", 400, RETRY),  # Kinesis stream UPDATING
    # a record that can never succeed: dead-letter it, go on
    ("ValidationException", 400, DEAD_LETTER),  # e.g. item over 400 KB
    ("SerializationException", 400, DEAD_LETTER),
    ("InvalidArgumentException", 400, DEAD_LETTER),
    ("EntityTooLarge", 400, DEAD_LETTER),
    ("KMS.InvalidCiphertextException", 400, DEAD_LETTER),
    ("ItemCollectionSizeLimitExceededException", 400, DEAD_LETTER),
    # configuration: stop loudly
    ("AccessDeniedException", 400, STOP),  # DynamoDB, Kinesis answer 400
    ("AccessDenied", 403, STOP),  # S3
    ("UnrecognizedClientException", 400, STOP),
    ("InvalidSignatureException", 400, STOP),
    ("ExpiredTokenException", 400, STOP),
    ("ResourceNotFoundException", 400, STOP),  # own table or stream missing
    ("NoSuchBucket", 404, STOP),
    ("KMSAccessDeniedException", 400, STOP),
    ("KMS.AccessDeniedException", 400, STOP),
    ("KMS.DisabledException", 400, STOP),
    ("KMS.NotFoundException", 400, STOP),
    ("KMSDisabledException", 400, STOP),
    # unknown codes: the HTTP status decides
    ("SomethingNew", 500, RETRY),
    ("SomethingNew", 503, RETRY),
    ("SomethingNew", 429, RETRY),
    ("SomethingNew", 408, RETRY),
    ("SomethingNew", None, RETRY),  # no response
    ("SomethingNew", 401, STOP),
    ("SomethingNew", 403, STOP),
    ("SomethingNew", 404, STOP),
    ("SomethingNew", 400, DEAD_LETTER),
    ("SomethingNew", 413, DEAD_LETTER),
]
BOTOCORE_CASES: list[tuple[Exception, str]] = [
    (bce.ConnectTimeoutError(endpoint_url="https://dynamodb"), RETRY),
    (bce.ReadTimeoutError(endpoint_url="https://dynamodb"), RETRY),
    (bce.EndpointConnectionError(endpoint_url="https://kinesis"), RETRY),
    (bce.ConnectionClosedError(endpoint_url="https://s3"), RETRY),
    (bce.NoCredentialsError(), STOP),
    (bce.NoRegionError(), STOP),
    (bce.ParamValidationError(report="Invalid length for parameter Key"), DEAD_LETTER),
]


class RaisesOnce:
    """Test handler: the first `handle` raises `error`, later ones pass."""

    def __init__(self, error: Exception | None = None, on: str = "x") -> None:
        self.error = error
        self.on = on
        self.seen: list[str] = []

    def handle(self, event: Event, record: Record) -> None:
        contact = getattr(event, "contact_id", "")
        if contact == self.on and self.error is not None:
            error, self.error = self.error, None
            raise error
        self.seen.append(contact)

    def is_settled(self, contact_id: str) -> bool:
        return True

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None


def _bus(*contacts: str) -> tuple[MemoryStream, MemoryStream, dict[str, tuple[str, bool]]]:
    stream, dead = MemoryStream("transcripts"), MemoryStream("dead")
    MemoryPublisher(stream).publish([CallStarted(c, "arn", 0) for c in contacts])
    return stream, dead, {}


def _loop(handler: Any, stream: MemoryStream, dead: Any, checkpoints: dict) -> ServiceLoop:
    source = MemorySource(stream, checkpoints)
    sink = dead if not isinstance(dead, MemoryStream) else MemoryPublisher(dead)
    return ServiceLoop("test", source, handler, sink, metrics=Metrics("test", "off"))


def _what_the_loop_does(error: Exception) -> str:
    """Raise `classify(error)` from a handler on the 2nd of 3 records; say what happened."""
    stream, dead, checkpoints = _bus("a", "x", "b")
    handler = RaisesOnce(classify(error, what="test write"))
    loop = _loop(handler, stream, dead, checkpoints)
    try:
        loop.process(loop.source.poll(), threading.Event())
    except ConfigurationFault:
        assert dead.shards[0] == [] and handler.seen == ["a"]
        loop.checkpoint()
        assert checkpoints[SHARD] == ("1", False)  # before the record, not past it
        return STOP
    if dead.shards[0]:
        (letter,) = [default_contract().decode(r.data) for r in dead.shards[0]]
        assert isinstance(letter, DeadLetter)
        assert letter.data == stream.shards[0][1].data  # the original bytes
        assert handler.seen == ["a", "b"]
        return DEAD_LETTER
    assert handler.seen == ["a", "x", "b"]  # handled again after the retry
    return RETRY


@pytest.mark.parametrize(("code", "status", "expected"), CASES)
def test_each_aws_error_code_is_retried_dead_lettered_or_stops_the_loop(
    code: str, status: int | None, expected: str
) -> None:
    assert _what_the_loop_does(client_error(code, status)) == expected


@pytest.mark.parametrize(("error", "expected"), BOTOCORE_CASES, ids=lambda x: type(x).__name__)
def test_botocore_errors_without_a_response_are_classified_too(
    error: Exception, expected: str
) -> None:
    assert _what_the_loop_does(error) == expected


def test_the_classified_error_says_what_failed_and_what_aws_answered() -> None:
    error = classify(client_error("ValidationException"), what="DynamoDB put to rows")
    assert isinstance(error, PoisonRecordError)
    assert error.reason.startswith("DynamoDB put to rows failed: ValidationException (HTTP 400)")
    retry = classify(client_error("SlowDown", 503), what="S3 upload")
    assert isinstance(retry, StoreUnavailable) and isinstance(retry, RetryableError)


def test_an_upload_failure_wrapped_by_boto3_is_classified_by_its_client_error() -> None:
    try:
        try:
            raise client_error("NoSuchBucket", 404, "PutObject")
        except ClientError as e:
            raise S3UploadFailedError(f"Failed to upload f to b/k: {e}")  # noqa: B904 (as boto3)
    except S3UploadFailedError as wrapped:
        assert outcome(wrapped) is Outcome.STOP
        assert isinstance(classify(wrapped, what="S3 upload"), ConfigurationFault)


# --- the Kinesis publisher ---------------------------------------------------------
class FakeKinesis:
    """put_records answers from a script: an exception to raise or per-entry error codes
    (by position in the request), or per partition key (`by_key`: each entry of that key
    takes the next code; None accepts it)."""

    def __init__(
        self,
        *answers: Exception | list[str | None],
        by_key: dict[str, list[str | None]] | None = None,
    ) -> None:
        self.answers = list(answers)
        self.by_key = {key: list(codes) for key, codes in (by_key or {}).items()}
        self.calls = 0
        self.attempts: dict[str, int] = {}

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls += 1
        for entry in Records:
            key = entry["PartitionKey"]
            self.attempts[key] = self.attempts.get(key, 0) + 1
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        codes = answer or [self._next(entry["PartitionKey"]) for entry in Records]
        results = [
            {"ErrorCode": code, "ErrorMessage": f"{code}!"} if code else {"SequenceNumber": "1"}
            for code in codes
        ]
        return {"FailedRecordCount": sum(1 for c in codes if c), "Records": results}

    def _next(self, key: str) -> str | None:
        codes = self.by_key.get(key)
        return codes.pop(0) if codes else None


def _publish(kinesis: FakeKinesis) -> None:
    KinesisPublisher(kinesis, "out", deadline_s=5).put_raw([("k1", b"one"), ("k2", b"two")])


def test_publisher_retries_throttled_entries_and_requests_until_accepted() -> None:
    # Each call backs off on its own (the publisher keeps a call's records in order), so
    # which entries share a request depends on the jitter: the script goes by key.
    kinesis = FakeKinesis(
        client_error("ProvisionedThroughputExceededException", 400, "PutRecords"),
        by_key={
            "k1": [
                "ProvisionedThroughputExceededException",
                "InternalFailure",
                "KMSThrottlingException",
            ]
        },
    )
    _publish(kinesis)
    assert kinesis.attempts == {"k1": 5, "k2": 2}


@pytest.mark.parametrize(
    "code", ["KMSAccessDeniedException", "KMSDisabledException", "KMSNotFoundException"]
)
def test_publisher_stops_at_once_on_a_kms_fault_of_one_entry(code: str) -> None:
    kinesis = FakeKinesis([None, code])
    with pytest.raises(ConfigurationFault, match=code):
        _publish(kinesis)
    assert kinesis.calls == 1


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (client_error("ResourceNotFoundException", 400, "PutRecords"), ConfigurationFault),
        (client_error("AccessDeniedException", 400, "PutRecords"), ConfigurationFault),
        (client_error("ValidationException", 400, "PutRecords"), PoisonRecordError),
    ],
)
def test_publisher_raises_what_no_retry_mends_at_once(error: Exception, raised: type) -> None:
    kinesis = FakeKinesis(error)
    with pytest.raises(raised):
        _publish(kinesis)
    assert kinesis.calls == 1


# --- the loop's stop path -------------------------------------------------------------
class ClosingSource(MemorySource):
    """MemorySource that remembers whether its leases were released."""

    closed = False

    def close(self) -> None:
        self.closed = True


class Buffering(RaisesOnce):
    """Test handler with a flush and a tick that can fail."""

    def __init__(self, flush_error: Exception | None = None, tick_error: Exception | None = None):
        super().__init__()
        self.flush_error = flush_error
        self.tick_error = tick_error

    def flush(self) -> None:
        if self.flush_error is not None:
            raise self.flush_error

    def tick(self) -> None:
        if self.tick_error is not None:
            raise self.tick_error


def _run_until_fault(
    handler: Any, sink: Any = None, contacts: tuple[str, ...] = ("a", "x", "b")
) -> tuple[ClosingSource, dict[str, tuple[str, bool]], MemoryStream, Metrics, BaseException]:
    stream, dead, checkpoints = _bus(*contacts)
    source = ClosingSource(stream, checkpoints)
    metrics = Metrics("test", "off")
    loop = ServiceLoop(
        "test", source, handler, sink or MemoryPublisher(dead), metrics=metrics, stop_grace_s=0
    )
    stop = threading.Event()
    timer = threading.Timer(20, stop.set)  # the loop must stop by itself long before
    timer.start()
    try:
        with pytest.raises(ConfigurationFault) as caught:
            loop.run(stop)
    finally:
        timer.cancel()
    assert stop.is_set()
    return source, checkpoints, dead, metrics, caught.value


def test_a_configuration_fault_stops_the_loop_before_the_record_without_a_dead_letter() -> None:
    fault = classify(client_error("ResourceNotFoundException"), what="DynamoDB put to rows")
    source, checkpoints, dead, metrics, raised = _run_until_fault(RaisesOnce(fault))
    assert raised is fault  # propagated to the caller (run_service exits non-zero)
    assert checkpoints[SHARD] == ("1", False)  # resumes at the faulty record
    assert dead.shards[0] == []
    assert source.closed  # leases released as on a normal stop
    assert metrics.value(CONFIGURATION_FAULTS) == 1
    assert metrics.value(ERRORS, type="ConfigurationFault") == 1
    assert metrics.value(DEAD_LETTERS) is None


@pytest.mark.parametrize("where", ["flush", "tick"])
def test_a_configuration_fault_in_flush_or_tick_stops_the_loop(where: str) -> None:
    fault = classify(client_error("AccessDeniedException"), what="DynamoDB batch write")
    handler = Buffering(**{f"{where}_error": fault})
    source, _, dead, metrics, raised = _run_until_fault(handler)
    assert raised is fault and source.closed and dead.shards[0] == []
    assert metrics.value(CONFIGURATION_FAULTS) == 1


class RefusingSink:
    """A dead-letter sink whose stream is missing (or refuses the letter)."""

    stream = "dead"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def put_raw(self, items: Any) -> None:
        raise self.error


@pytest.mark.parametrize(
    "sink_error",
    [
        classify(client_error("ResourceNotFoundException", 400, "PutRecords"), what="dead"),
        classify(client_error("ValidationException", 400, "PutRecords"), what="dead"),
    ],
    ids=["stream missing", "letter refused"],
)
def test_a_dead_letter_that_cannot_be_stored_stops_the_loop(sink_error: Exception) -> None:
    poison = PoisonRecordError("undecodable")
    source, checkpoints, _, metrics, _ = _run_until_fault(
        RaisesOnce(poison), sink=RefusingSink(sink_error)
    )
    assert checkpoints[SHARD] == ("1", False) and source.closed
    assert metrics.value(CONFIGURATION_FAULTS) == 1


def test_run_service_exits_with_status_3_on_a_configuration_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from callstream import service

    class FaultyLoop:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def run(self, stop: threading.Event) -> None:
            raise ConfigurationFault("DynamoDB put to rows failed: ResourceNotFoundException")

    stubs: dict[str, Callable[..., Any]] = {
        "ServiceLoop": FaultyLoop,
        "KinesisSource": lambda *a, **k: None,
        "LeaseTable": lambda *a, **k: type("T", (), {"ensure_table": lambda self: None})(),
        "ensure_stream": lambda *a, **k: None,
        "KinesisPublisher": lambda *a, **k: None,
    }
    for name, stub in stubs.items():
        monkeypatch.setattr(service, name, stub)
    monkeypatch.setattr(service.aws, "client", lambda *a, **k: None)
    if hasattr(service, "lease_client"):
        monkeypatch.setattr(service, "lease_client", lambda *a, **k: None)
    monkeypatch.setattr(service.signal, "signal", lambda *a: None)
    from callstream.config import BusSettings, Env

    bus = BusSettings.from_env(Env({}))
    with pytest.raises(SystemExit) as caught:
        service.run_service("persister", bus, "transcripts", RaisesOnce())
    assert caught.value.code == 3


class RejectsRowOf(RaisesOnce):
    """Test handler like the persister: buffers rows, its flush refuses the row of `on`."""

    def __init__(self, on: str) -> None:
        super().__init__(on=on)
        self.pending: dict[str, Record] = {}
        self.rejected: dict[str, Record] = {}

    def handle(self, event: Event, record: Record) -> None:
        self.pending[getattr(event, "contact_id", "")] = record

    def is_settled(self, contact_id: str) -> bool:
        return contact_id not in self.pending and contact_id not in self.rejected

    def flush(self) -> None:
        for record in self.rejected.values():
            raise PoisonRecordError("row over 400 KB", record)
        if self.on in self.pending:
            self.rejected[self.on] = record = self.pending.pop(self.on)
            raise PoisonRecordError("row over 400 KB", record)
        self.pending.clear()

    def dead_lettered(self, record: Record) -> None:
        self.rejected = {c: r for c, r in self.rejected.items() if r != record}


class FailsOnce:
    """A dead-letter sink that is unavailable once, then stores."""

    stream = "dead"

    def __init__(self, target: MemoryStream) -> None:
        self.inner = MemoryPublisher(target)
        self.failed = False

    def put_raw(self, items: Any) -> None:
        if not self.failed:
            self.failed = True
            raise StoreUnavailable("dead-letter stream throttled past the deadline")
        self.inner.put_raw(items)


def test_a_row_refused_at_flush_is_dead_lettered_and_its_call_held_until_the_letter_is_stored():
    stream, dead, checkpoints = _bus("a", "x", "b")
    handler = RejectsRowOf("x")
    loop = _loop(handler, stream, FailsOnce(dead), checkpoints)
    loop.process(loop.source.poll())
    with pytest.raises(StoreUnavailable):  # the letter could not be stored yet
        loop.flush()
    assert not handler.is_settled("x")  # so the checkpoint cannot pass its record
    loop.checkpoint()
    assert checkpoints[SHARD] == ("1", True)  # a and b are not flushed yet either
    loop.flush()  # the next flush stores the letter it still owes
    (letter,) = [default_contract().decode(r.data) for r in dead.shards[0]]
    assert isinstance(letter, DeadLetter) and letter.data == stream.shards[0][1].data
    assert handler.is_settled("x")
    loop.checkpoint()
    assert checkpoints[SHARD] == ("3", False)
