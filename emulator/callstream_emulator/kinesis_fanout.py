"""Enhanced fan-out in the embedded emulator: the consumer registry and SubscribeToShard.

moto 5.2.5 registers stream consumers but always reports them ACTIVE, gives
ARNs without the creation time, accepts a name twice, deregisters by name
backwards, and has no SubscribeToShard. `FanoutHub.patch()` fixes the registry
on moto's backend; `FanoutHub.middleware()` wraps moto's WSGI app so a
`Kinesis_20131202.SubscribeToShard` request (boto3 sends every Kinesis call to
the one endpoint) is answered here, over the real wire protocol:

- the request is JSON as for any Kinesis call; errors before the stream
  starts are ordinary JSON error answers (HTTP 400: ResourceNotFoundException,
  ResourceInUseException, InvalidArgumentException, LimitExceededException);
- the answer is HTTP 200, `application/vnd.amazon.eventstream`, chunked:
  AWS event-stream messages (prelude with lengths and CRC32, string headers
  `:message-type`, `:event-type` / `:exception-type`, `:content-type`,
  a JSON payload, CRC32 of the whole message). The first is the
  `initial-response` event botocore waits for; then `SubscribeToShardEvent`s
  with Records, ContinuationSequenceNumber and MillisBehindLatest; at the
  end of a closed shard one event with ChildShards and no
  ContinuationSequenceNumber, and the stream ends. Real AWS speaks HTTP/2;
  boto3 reads the same messages over HTTP/1.1.

Behaviour, after the API reference and the developer guide:
- a consumer is CREATING for `consumer_activation_s` after RegisterStreamConsumer,
  then ACTIVE; DELETING as long after DeregisterStreamConsumer, then gone;
  only an ACTIVE consumer may subscribe (else ResourceInUseException);
- a subscription lasts `subscription_s` (AWS: 5 minutes), then the stream
  ends normally; resubscribing with AFTER_SEQUENCE_NUMBER and the last
  ContinuationSequenceNumber goes on without a gap or a repeat;
- events are pushed as records arrive (every shard append wakes the hub),
  and at least every `idle_event_s` (AWS: about 5 s) when there are none;
  the first event is sent at once;
- each consumer gets its own 2 MiB/s per shard (`kinesis_quotas`), one
  SubscribeToShard per second per consumer and shard (LimitExceededException);
- a second SubscribeToShard for the same consumer and shard within
  `takeover_s` (AWS: 5 s) of the first is refused with ResourceInUseException;
  later it takes over, and the older stream ends with a ResourceInUseException
  event.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import select
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from moto.core.exceptions import JsonRESTError
from moto.kinesis.exceptions import InvalidArgumentError, ResourceInUseError, ResourceNotFoundError
from moto.kinesis.models import Consumer, KinesisBackend, Shard, Stream, kinesis_backends

from callstream_emulator.kinesis_quotas import MAX_RECORDS_PER_GET, MIB, KinesisQuotas

if TYPE_CHECKING:
    from callstream_emulator.moto_patches import PatchSet

logger = logging.getLogger(__name__)

SUBSCRIBE_TARGET = "Kinesis_20131202.SubscribeToShard"
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"
MAX_CONSUMERS_PER_STREAM = 20
STARTING_POSITIONS = (
    "AT_SEQUENCE_NUMBER",
    "AFTER_SEQUENCE_NUMBER",
    "AT_TIMESTAMP",
    "TRIM_HORIZON",
    "LATEST",
)
_WAKE_S = 0.5  # longest sleep between checks that the client is still there
_ACTIVE_AT = "callstream_active_at"  # attributes kept on moto's Consumer objects
_GONE_AT = "callstream_gone_at"

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


# -- settings --------------------------------------------------------------------------


@dataclass
class FanoutSettings:
    """Timings of enhanced fan-out; may be changed while the emulator runs."""

    subscription_s: float = 300.0
    idle_event_s: float = 5.0
    consumer_activation_s: float = 0.5
    takeover_s: float = 5.0
    event_max_bytes: int = 1 * MIB
    _defaults: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._validate(self._values())
        self._defaults = self._values()

    def configure(self, **values: float) -> None:
        """Set some of the settings (names as the fields); all must be > 0."""
        unknown = set(values) - set(self._defaults)
        if unknown:
            raise ValueError(f"unknown fan-out settings {sorted(unknown)}")
        self._validate(values)
        for name, value in values.items():
            setattr(self, name, type(self._defaults[name])(value))

    def restore_default(self) -> None:
        """Back to the values the emulator started with."""
        for name, value in self._defaults.items():
            setattr(self, name, value)

    def snapshot(self) -> dict[str, float]:
        """The current settings, JSON-ready."""
        return self._values()

    def _values(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    @staticmethod
    def _validate(values: dict[str, Any]) -> None:
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"fan-out setting {name} must be a number > 0, got {value!r}")


# -- the event-stream wire format ---------------------------------------------------


def encode_message(headers: list[tuple[str, str]], payload: bytes) -> bytes:
    """One AWS event-stream message with string headers (header value type 7)."""
    head = b"".join(
        struct.pack("!B", len(name.encode()))
        + name.encode()
        + struct.pack("!BH", 7, len(value))
        + value.encode()
        for name, value in headers
    )
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack("!I", zlib.crc32(message))


def event_message(event_type: str, body: dict[str, Any]) -> bytes:
    """An `event` message carrying a JSON body."""
    return encode_message(
        [
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        json.dumps(body, separators=(",", ":")).encode(),
    )


def exception_message(exception_type: str, message: str) -> bytes:
    """An `exception` message: botocore raises it as EventStreamError while iterating."""
    return encode_message(
        [
            (":exception-type", exception_type),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json.dumps({"message": message}).encode(),
    )


# -- consumers ------------------------------------------------------------------------


class ConsumerClock:
    """CREATING / ACTIVE / DELETING of moto's Consumer objects, kept on them as attributes."""

    def __init__(self, settings: FanoutSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock

    def created(self, consumer: Consumer) -> None:
        """The consumer was just registered: CREATING for a while."""
        setattr(consumer, _ACTIVE_AT, self.clock() + self.settings.consumer_activation_s)

    def deleting(self, consumer: Consumer) -> None:
        """The consumer was just deregistered: DELETING for a while, then gone."""
        setattr(consumer, _GONE_AT, self.clock() + self.settings.consumer_activation_s)

    def status(self, consumer: Consumer) -> str:
        """CREATING, ACTIVE or DELETING."""
        if getattr(consumer, _GONE_AT, None) is not None:
            return "DELETING"
        if self.clock() < getattr(consumer, _ACTIVE_AT, 0.0):
            return "CREATING"
        return "ACTIVE"

    def purge(self, stream: Stream) -> None:
        """Forget consumers whose deletion has finished."""
        now = self.clock()
        stream.consumers = [
            c for c in stream.consumers if now < (getattr(c, _GONE_AT, None) or float("inf"))
        ]


def _stream_by_arn(backend: KinesisBackend, stream_arn: str) -> Stream:
    for stream in backend.streams.values():
        if stream.arn == stream_arn:
            return stream
    account = backend.account_id
    raise ResourceNotFoundError(f"Stream {stream_arn} under account {account} not found.")


# -- subscriptions ----------------------------------------------------------------------


@dataclass
class _Subscription:
    consumer: Consumer
    stream: Stream
    shard: Shard
    position: int  # sequence number of the last record sent (or before the start)
    started: float
    deadline: float
    superseded: bool = False
    ended: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.consumer.consumer_arn, self.shard.shard_id)


@dataclass
class _Batch:
    records: list[dict[str, Any]]
    size: int
    last: int
    behind_ms: int
    shard_ended: bool


class FanoutHub:
    """Enhanced fan-out for one emulator: registry patches plus the SubscribeToShard server."""

    def __init__(
        self,
        quotas: KinesisQuotas,
        settings: FanoutSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quotas = quotas
        self.settings = settings or FanoutSettings()
        self.clock = clock
        self.consumers = ConsumerClock(self.settings, clock)
        self._cond = threading.Condition()
        self._version = 0
        self._closed = False
        self._active: dict[tuple[str, str], _Subscription] = {}
        self._shard_lock: Any = threading.RLock()

    # -- lifecycle ------------------------------------------------------------------------

    def patch(self, patches: PatchSet, shard_lock: Any) -> None:
        """Fix moto's consumer registry; wake subscriptions on every shard append."""
        self._shard_lock = shard_lock
        _patch_registry(patches, self)
        original = Shard.put_record

        def put_record(shard: Shard, *args: Any, **kwargs: Any) -> Any:
            sequence = original(shard, *args, **kwargs)
            self.notify()
            return sequence

        patches.replace(Shard, "put_record", put_record)

    def notify(self) -> None:
        """Something changed (a record, a reshard, a consumer): wake every subscription."""
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def close(self) -> None:
        """End every subscription (emulator shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def active_subscriptions(self) -> int:
        """Subscriptions streaming right now."""
        with self._cond:
            return sum(not s.ended for s in self._active.values())

    def middleware(self, app: WsgiApp) -> WsgiApp:
        """moto's WSGI app with SubscribeToShard answered here."""

        def dispatch(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("HTTP_X_AMZ_TARGET") == SUBSCRIBE_TARGET:
                return self.serve(environ, start_response)
            return app(environ, start_response)

        return dispatch

    # -- the request ----------------------------------------------------------------------

    def serve(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """WSGI: a JSON error, or the event stream of a new subscription."""
        request_id = str(uuid.uuid4())
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
            if not isinstance(request, dict):
                raise InvalidArgumentError("the request body must be a JSON object")
            subscription = self._subscribe(request)
        except (ValueError, UnicodeDecodeError) as e:
            return _error(start_response, request_id, "SerializationException", str(e))
        except JsonRESTError as e:
            return _error(start_response, request_id, e.error_type, e.message)
        start_response(
            "200 OK", [("Content-Type", EVENT_STREAM_TYPE), ("x-amzn-RequestId", request_id)]
        )
        logger.info(
            "SubscribeToShard %s on %s from sequence %d",
            subscription.consumer.consumer_name,
            subscription.shard.shard_id,
            subscription.position,
            extra={"shard_id": subscription.shard.shard_id},
        )
        return self._events(subscription, environ.get("werkzeug.socket"))

    def _subscribe(self, request: dict[str, Any]) -> _Subscription:
        consumer_arn, shard_id = request.get("ConsumerARN"), request.get("ShardId")
        if not isinstance(consumer_arn, str) or not isinstance(shard_id, str):
            raise InvalidArgumentError("ConsumerARN and ShardId are required strings")
        consumer, stream = self._consumer(consumer_arn)
        status = self.consumers.status(consumer)
        if status != "ACTIVE":
            raise ResourceInUseError(f"Consumer {consumer_arn} is {status}, not ACTIVE.")
        shard = stream.get_shard(shard_id)
        with self._shard_lock:
            position = _start_position(shard, request.get("StartingPosition"))
        now = self.clock()
        with self._cond:
            current = self._active.get((consumer_arn, shard_id))
            if current is not None and current.ended:
                current = None
            if current is not None and now - current.started < self.settings.takeover_s:
                raise ResourceInUseError(
                    f"Another active subscription exists for consumer {consumer_arn} "
                    f"on shard {shard_id}."
                )
            if not self.quotas.admit_subscribe(consumer_arn, stream.arn, shard_id):
                raise JsonRESTError(
                    "LimitExceededException",
                    f"Rate exceeded for SubscribeToShard by consumer {consumer_arn} "
                    f"on shard {shard_id}: at most 1 call per second.",
                )
            if current is not None:
                current.superseded = True
            deadline = now + self.settings.subscription_s
            subscription = _Subscription(consumer, stream, shard, position, now, deadline)
            self._active[subscription.key] = subscription
            self._cond.notify_all()
        return subscription

    def _consumer(self, consumer_arn: str) -> tuple[Consumer, Stream]:
        parts = consumer_arn.split(":")
        if len(parts) < 6 or "/consumer/" not in consumer_arn:
            raise InvalidArgumentError(f"malformed ConsumerARN {consumer_arn!r}")
        region, account = parts[3], parts[4]
        try:
            backend = kinesis_backends[account][region]
        except KeyError as e:
            raise ResourceNotFoundError(f"Consumer {consumer_arn} not found.") from e
        for stream in list(backend.streams.values()):
            self.consumers.purge(stream)
            consumer = stream.get_consumer_by_arn(consumer_arn)
            if consumer is not None:
                return consumer, stream
        raise ResourceNotFoundError(f"Consumer {consumer_arn}, account {account} not found.")

    # -- the event stream -------------------------------------------------------------------

    def _events(self, subscription: _Subscription, sock: Any) -> Iterator[bytes]:
        try:
            yield event_message("initial-response", {})
            yield from self._pump(subscription, sock)
        except Exception as e:  # never leave a half-written stream without a reason
            logger.exception("SubscribeToShard stream failed")
            yield exception_message("InternalFailureException", f"emulator error: {e}")
        finally:
            with self._cond:
                subscription.ended = True
                if self._active.get(subscription.key) is subscription:
                    del self._active[subscription.key]

    def _pump(self, subscription: _Subscription, sock: Any) -> Iterator[bytes]:
        last_event: float | None = None
        while True:
            with self._cond:
                version = self._version
                closed, superseded = self._closed, subscription.superseded
            ending = self._ending(subscription, closed, superseded, sock)
            if ending is not None:
                if ending:
                    yield ending
                return
            now = self.clock()
            batch = self._next_batch(subscription)
            idle = last_event is not None and now - last_event < self.settings.idle_event_s
            if batch is None or (not batch.records and idle and not batch.shard_ended):
                timeout = self.settings.idle_event_s - (now - (last_event or now))
                if batch is None:
                    timeout = self.quotas.fanout_wait_s(*subscription.key)
                self._wait(version, min(timeout, subscription.deadline - now, _WAKE_S))
                continue
            yield self._send(subscription, batch)
            last_event = now
            if batch.shard_ended:
                return

    def _ending(
        self, subscription: _Subscription, closed: bool, superseded: bool, sock: Any
    ) -> bytes | None:
        """What ends the stream now: b"" to end quietly, an exception message, or None."""
        if closed or self.clock() >= subscription.deadline or _peer_gone(sock):
            return b""
        if superseded:
            return exception_message(
                "ResourceInUseException",
                f"Another subscription took over consumer {subscription.consumer.consumer_arn} "
                f"on shard {subscription.shard.shard_id}.",
            )
        if self.consumers.status(subscription.consumer) != "ACTIVE":
            return exception_message(
                "ResourceNotFoundException",
                f"Consumer {subscription.consumer.consumer_arn} is being deregistered.",
            )
        return None

    def _next_batch(self, subscription: _Subscription) -> _Batch | None:
        """Records after the position that the consumer's budget allows; None: over budget."""
        consumer_arn, shard_id = subscription.key
        allowance = min(
            self.quotas.fanout_allowance(consumer_arn, shard_id), self.settings.event_max_bytes
        )
        if allowance <= 0:
            return None
        shard = subscription.shard
        with self._shard_lock:
            newest = _newest(shard)
            records: list[Any] = []
            size = 0
            sequence = subscription.position + 1
            while sequence <= newest and len(records) < MAX_RECORDS_PER_GET:
                record = shard.records.get(sequence)
                sequence += 1
                if record is None:
                    continue
                record_size = _record_size(record)
                if records and size + record_size > allowance:
                    break
                records.append(record)
                size += record_size
            last = records[-1].sequence_number if records else subscription.position
            behind = 0
            if last < newest and records:
                behind = int((shard.records[newest].created_at - records[-1].created_at) * 1000)
            ended = not shard.is_open and last >= newest
        return _Batch([_record_json(r) for r in records], size, last, max(0, behind), ended)

    def _send(self, subscription: _Subscription, batch: _Batch) -> bytes:
        body: dict[str, Any] = {"Records": batch.records, "MillisBehindLatest": batch.behind_ms}
        if batch.shard_ended:
            from callstream_emulator.moto_patches import child_shards

            with self._shard_lock:
                body["ChildShards"] = child_shards(subscription.stream, subscription.shard.shard_id)
        else:
            body["ContinuationSequenceNumber"] = str(batch.last)
        subscription.position = batch.last
        if batch.size:
            consumer_arn, shard_id = subscription.key
            self.quotas.charge_fanout(consumer_arn, subscription.stream.arn, shard_id, batch.size)
        return event_message("SubscribeToShardEvent", body)

    def _wait(self, version: int, timeout: float) -> None:
        deadline = self.clock() + max(0.0, timeout)
        with self._cond:
            while self._version == version and not self._closed:
                remaining = deadline - self.clock()
                if remaining <= 0 or not self._cond.wait(remaining):
                    return


# -- helpers ----------------------------------------------------------------------------


def _error(start_response: Any, request_id: str, code: str, message: str) -> list[bytes]:
    payload = json.dumps({"__type": code, "message": message}).encode()
    start_response(
        "400 Bad Request",
        [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("Content-Length", str(len(payload))),
            ("x-amzn-RequestId", request_id),
        ],
    )
    return [payload]


def _start_position(shard: Shard, position: Any) -> int:
    """The sequence number a StartingPosition starts after."""
    if not isinstance(position, dict) or position.get("Type") not in STARTING_POSITIONS:
        allowed = "|".join(STARTING_POSITIONS)
        raise InvalidArgumentError(f"StartingPosition.Type must be one of {allowed}")
    kind = position["Type"]
    if kind == "TRIM_HORIZON":
        return 0
    if kind == "LATEST":
        return _newest(shard)
    if kind == "AT_TIMESTAMP":
        return int(shard.get_sequence_number_at(_timestamp(position.get("Timestamp"))))
    number = position.get("SequenceNumber")
    if not isinstance(number, str) or not number.isdigit():
        raise InvalidArgumentError(
            f"StartingPosition {kind} needs a SequenceNumber, not {number!r}"
        )
    return int(number) - 1 if kind == "AT_SEQUENCE_NUMBER" else int(number)


def _newest(shard: Shard) -> int:
    """The shard's last sequence number (0 when empty), without copying its keys as moto does."""
    return int(next(reversed(shard.records), 0))


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise InvalidArgumentError(f"StartingPosition AT_TIMESTAMP needs a Timestamp, got {value!r}")


def _record_size(record: Any) -> int:
    try:
        data = len(base64.b64decode(record.data))
    except (binascii.Error, TypeError):
        data = len(record.data)
    return data + len(record.partition_key.encode("utf-8"))


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "SequenceNumber": str(record.sequence_number),
        "ApproximateArrivalTimestamp": record.created_at,
        "Data": record.data,  # moto keeps the request's base64 text
        "PartitionKey": record.partition_key,
    }


def _peer_gone(sock: Any) -> bool:
    """Whether the client closed its end (the request body was read: readable means EOF)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# -- moto's consumer registry ---------------------------------------------------------------


def _patch_registry(patches: PatchSet, hub: FanoutHub) -> None:
    clock = hub.consumers
    describe = _describe_consumer(clock, KinesisBackend.describe_stream_consumer)
    patches.replace(Consumer, "to_json", _consumer_json(clock, Consumer.to_json))
    patches.replace(KinesisBackend, "register_stream_consumer", _register_consumer(clock))
    patches.replace(KinesisBackend, "describe_stream_consumer", describe)
    patches.replace(
        KinesisBackend,
        "list_stream_consumers",
        _list_consumers(clock, KinesisBackend.list_stream_consumers),
    )
    patches.replace(
        KinesisBackend, "deregister_stream_consumer", _deregister_consumer(hub, describe)
    )


def _consumer_json(clock: ConsumerClock, original: Callable[..., dict[str, Any]]) -> Any:
    def to_json(self: Consumer, include_stream_arn: bool = False) -> dict[str, Any]:
        answer = original(self, include_stream_arn)
        answer["ConsumerStatus"] = clock.status(self)
        return answer

    return to_json


def _register_consumer(clock: ConsumerClock) -> Any:
    def register(self: KinesisBackend, stream_arn: str, consumer_name: str) -> Consumer:
        stream = _stream_by_arn(self, stream_arn)
        clock.purge(stream)
        if any(c.consumer_name == consumer_name for c in stream.consumers):
            raise ResourceInUseError(
                f"Consumer {consumer_name} under stream {stream.stream_name} already exists "
                f"for account {self.account_id}."
            )
        if len(stream.consumers) >= MAX_CONSUMERS_PER_STREAM:
            raise JsonRESTError(
                "LimitExceededException",
                f"Stream {stream.stream_name} already has {MAX_CONSUMERS_PER_STREAM} consumers.",
            )
        consumer = Consumer(consumer_name, self.account_id, self.region_name, stream.arn)
        # AWS puts the creation time in the ARN, so a re-registered name gets a new ARN.
        consumer.consumer_arn += f":{int(consumer.created.timestamp())}"
        clock.created(consumer)
        stream.consumers.append(consumer)
        return consumer

    return register


def _describe_consumer(clock: ConsumerClock, original: Callable[..., Consumer]) -> Any:
    def describe(
        self: KinesisBackend, stream_arn: str, consumer_name: str, consumer_arn: str
    ) -> Consumer:
        if stream_arn:
            _stream_by_arn(self, stream_arn)
        for stream in list(self.streams.values()):
            clock.purge(stream)
        return original(self, stream_arn, consumer_name, consumer_arn)

    return describe


def _list_consumers(clock: ConsumerClock, original: Callable[..., Any]) -> Any:
    def list_consumers(self: KinesisBackend, stream_arn: str, **kwargs: Any) -> Any:
        clock.purge(_stream_by_arn(self, stream_arn))
        return original(self, stream_arn=stream_arn, **kwargs)

    return list_consumers


def _deregister_consumer(hub: FanoutHub, describe: Callable[..., Consumer]) -> Any:
    def deregister(
        self: KinesisBackend, stream_arn: str, consumer_name: str, consumer_arn: str
    ) -> None:
        consumer = describe(self, stream_arn, consumer_name, consumer_arn)
        if hub.consumers.status(consumer) != "DELETING":
            hub.consumers.deleting(consumer)
            hub.notify()  # its subscriptions end

    return deregister
