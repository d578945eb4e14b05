"""Enhanced fan-out: the leased consumer reading its shards over SubscribeToShard.

`FanOutSource` is a `KinesisSource` (same leases, balancing, fence,
checkpoints and resharding) whose reader, `FanOutReader`, keeps one
subscription per held shard instead of polling. A registered consumer gets
2 MiB/s per shard of its own, pushed as records arrive, where polling groups
share a shard's 5 GetRecords and 2 MiB per second; so a group reading with
fan-out neither slows the others nor waits for its turn.

Per held shard a thread subscribes from the holding's start (the lease
checkpoint: AT/AFTER_SEQUENCE_NUMBER, else TRIM_HORIZON) and puts what each
event brings into a bounded buffer (`buffer_records` per shard; when it is
full the thread stops reading and the connection's flow control holds the
server back). A subscription lasts at most 5 minutes: the thread subscribes
again AFTER_SEQUENCE_NUMBER the last `ContinuationSequenceNumber` (as the
KCL, Flink and others do), and drops any record at or before the last one
it delivered, so a renewal has neither a gap nor a repeat. A
failed or refused subscription (`ResourceInUseException`: another
subscription of this consumer to the shard is younger than 5 s; throttling;
a dropped connection) is retried with jittered backoff, never sooner than
a second after the previous call (AWS allows one per second per consumer
and shard). An event with `ChildShards`, or without a continuation, ends a
closed shard: the batch is marked `at_end`, and the source drains and
finishes the shard as after a polled read of its end; its children are
taken by the heartbeat's shard listing, as in polling mode. A shard whose
holding ends (lost, fenced, finished, released) has its subscription stopped
and its buffer dropped at once, so nothing read for an old holding is ever
returned or checkpointed. Errors that no retry mends (access denied, the
consumer deregistered) are raised by the next `poll()` as
`ConfigurationFault`, which stops the service loudly.

`register_consumer` returns a consumer's ARN, registering it if absent and
waiting until it is ACTIVE; a consumer made by the deploy template needs no
RegisterStreamConsumer permission (it is described first).

boto3 sends SubscribeToShard over HTTP/1.1 (botocore has no HTTP/2); AWS
documents the call as HTTP/2. The emulator speaks the event-stream framing
boto3 expects; against AWS this path has not been run.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ReadTimeoutError as BotoReadTimeout
from urllib3.exceptions import ReadTimeoutError as Urllib3ReadTimeout

from callstream.awserrors import Outcome, classify, error_code, outcome
from callstream.bus.consumer import KinesisSource
from callstream.bus.leases import LeaseTable
from callstream.bus.ports import Record
from callstream.bus.reader import Batch, Position, ShardRead
from callstream.errors import ConfigurationFault
from callstream.metrics import Metrics

log = logging.getLogger(__name__)
SUBSCRIPTIONS = (
    "fanout_subscriptions"  # counter, label shard: SubscribeToShard calls that succeeded
)
SUBSCRIBE_FAILURES = "fanout_subscribe_failures"  # counter, labels shard, code
MIN_SUBSCRIBE_GAP_S = 1.0  # AWS: one SubscribeToShard per second per consumer and shard
RETRY_CAP_S = 10.0
DEFAULT_BUFFER_RECORDS = 2000  # per shard: about 4 MB of 128 ms audio chunks


class FanOutReader:
    """One SubscribeToShard subscription per held shard, each feeding a bounded buffer."""

    def __init__(
        self,
        kinesis: Any,
        stream: str,
        consumer_arn: str,
        *,
        buffer_records: int = DEFAULT_BUFFER_RECORDS,
        max_wait_s: float = 0.2,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.consumer_arn = consumer_arn
        self.buffer_records = buffer_records
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.clock = clock
        self._cond = threading.Condition()  # guards every subscription's buffer and _subs
        self._subs: dict[str, _Subscription] = {}
        self._fault: ConfigurationFault | None = None

    # --- ShardReader --------------------------------------------------------
    def follow(self, reads: list[ShardRead]) -> None:
        """Subscribe for new holdings; stop subscriptions of holdings no longer read."""
        with self._cond:
            wanted = {read.shard_id: read for read in reads}
            for shard_id in [s for s in self._subs if s not in wanted]:
                self._subs.pop(shard_id).stop()
            for shard_id, read in wanted.items():
                sub = self._subs.get(shard_id)
                if sub is None or sub.read.holding != read.holding:
                    self._start(read)

    def read(self, reads: list[ShardRead]) -> list[Batch]:
        """What the subscriptions of these holdings brought, waiting up to `max_wait_s`."""
        self._raise_fault()
        wanted = {(read.shard_id, read.holding) for read in reads}
        with self._cond:
            batches = self._drain(wanted)
            if not batches:
                self._cond.wait(self.max_wait_s)
                batches = self._drain(wanted)
        self._raise_fault()
        return batches

    def rewind(self, read: ShardRead) -> None:
        """Subscribe again from `read.start`, dropping what the old subscription buffered."""
        with self._cond:
            self._start(read)

    def release(self, shard_id: str) -> None:
        """Stop the shard's subscription and drop its buffer."""
        with self._cond:
            sub = self._subs.pop(shard_id, None)
            if sub is not None:
                sub.stop()

    def close(self) -> None:
        """Stop every subscription."""
        with self._cond:
            for sub in self._subs.values():
                sub.stop()
            self._subs.clear()
            self._cond.notify_all()

    # --- internals ------------------------------------------------------------
    def _start(self, read: ShardRead) -> None:
        old = self._subs.pop(read.shard_id, None)
        if old is not None:
            old.stop()
        sub = _Subscription(self, read)
        self._subs[read.shard_id] = sub
        sub.start()

    def _drain(self, wanted: set[tuple[str, int]]) -> list[Batch]:
        batches: list[Batch] = []
        for shard_id, sub in self._subs.items():
            if (shard_id, sub.read.holding) in wanted and sub.buffer:
                batches.append(sub.take())
        if batches:
            self._cond.notify_all()  # room in the buffers again
        return batches

    def _raise_fault(self) -> None:
        if self._fault is not None:
            raise self._fault

    def fault(self, error: ConfigurationFault) -> None:
        """A subscription met an error no retry mends: the next read raises it."""
        with self._cond:
            self._fault = error
            self._cond.notify_all()

    def count(self, name: str, shard: str, code: str | None = None) -> None:
        """Count a metric, if the reader has metrics."""
        if self.metrics is None:
            return
        if code is None:
            self.metrics.count(name, shard=shard)
        else:
            self.metrics.count(name, shard=shard, code=code)


class _Subscription:
    """One held shard's subscriptions, renewed until stopped or the shard ends."""

    def __init__(self, reader: FanOutReader, read: ShardRead) -> None:
        self.reader = reader
        self.read = read
        self.position = read.start
        self.last = _delivered_before(read.start)  # records at or before it are dropped
        self.buffer: deque[Batch] = deque()
        self.buffered = 0  # records in `buffer`
        self.stopped = threading.Event()
        self._stream: Any = None
        self._thread = threading.Thread(
            target=self._run, name=f"fanout-{read.shard_id}", daemon=True
        )
        self._extra = {"stream": reader.stream, "shard_id": read.shard_id}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop at once: no more batches; an open connection is shut down. Under the cond."""
        self.stopped.set()
        self.buffer.clear()
        self.buffered = 0
        if self._stream is not None:
            _abort(self._stream)
        self.reader._cond.notify_all()

    def take(self) -> Batch:
        """Everything buffered, as one batch (under the reader's cond)."""
        batches = list(self.buffer)
        self.buffer.clear()
        self.buffered = 0
        return Batch(
            self.read.shard_id,
            self.read.holding,
            [record for batch in batches for record in batch.records],
            at_end=batches[-1].at_end,
            millis_behind=batches[-1].millis_behind,
        )

    # --- the thread -------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self.stopped.is_set():
            called = time.monotonic()
            try:
                if self._subscribe_once():
                    return
                failures = 0
                delay = 0.0
            except (BotoReadTimeout, Urllib3ReadTimeout):
                # No event for a whole read timeout: a quiet shard, not a failure. Renew.
                log.debug("subscription idle past the read timeout; renewed", extra=self._extra)
                delay = 0.0
            except (ClientError, BotoCoreError) as e:
                if outcome(e) is Outcome.STOP:
                    what = f"subscribe_to_shard {self.reader.stream} {self.read.shard_id}"
                    self.reader.fault(ConfigurationFault(f"{what}: {classify(e, what=what)}"))
                    return
                failures += 1
                delay = self._failed(e, failures)
            except Exception as e:  # a dropped connection mid-stream (urllib3, socket)
                failures += 1
                delay = self._failed(e, failures)
            # AWS allows one SubscribeToShard per second per consumer and shard.
            gap = MIN_SUBSCRIBE_GAP_S - (time.monotonic() - called)
            self.stopped.wait(max(delay, gap))

    def _failed(self, error: Exception, failures: int) -> float:
        code = error_code(error) if isinstance(error, ClientError) else type(error).__name__
        self.reader.count(SUBSCRIBE_FAILURES, shard=self.read.shard_id, code=code)
        delay = min(RETRY_CAP_S, MIN_SUBSCRIBE_GAP_S * 2 ** (failures - 1)) * (
            0.5 + random.random()
        )
        if not self.stopped.is_set():
            log.warning(
                "subscription failed %d times in a row (%s); again in %.1f s",
                failures,
                code,
                delay,
                extra=self._extra,
            )
        return delay

    def _subscribe_once(self) -> bool:
        """One subscription to its end; True if the shard ended or we were stopped."""
        response = self.reader.kinesis.subscribe_to_shard(
            ConsumerARN=self.reader.consumer_arn,
            ShardId=self.read.shard_id,
            StartingPosition=self.position.starting_position(),
        )
        stream = response["EventStream"]
        with self.reader._cond:
            if self.stopped.is_set():
                _abort(stream)
                return True
            self._stream = stream
        self.reader.count(SUBSCRIPTIONS, shard=self.read.shard_id)
        try:
            for event in stream:
                body = event.get("SubscribeToShardEvent")
                if self.stopped.is_set():
                    return True
                if body is not None and self._deliver(body):
                    log.info("shard ended (subscription)", extra=self._extra)
                    return True
        finally:
            with self.reader._cond:
                self._stream = None
            _abort(stream)
        return self.stopped.is_set()  # else the subscription expired: renew it

    def _deliver(self, body: dict[str, Any]) -> bool:
        """Buffer one event's new records; True if it ends the shard."""
        records = [
            _record(self.reader.stream, self.read.shard_id, r)
            for r in body.get("Records", [])
            if self.last is None or int(r["SequenceNumber"]) > self.last
        ]
        continuation = body.get("ContinuationSequenceNumber")
        at_end = continuation is None or bool(body.get("ChildShards"))
        if continuation is not None:
            self.position = Position("AFTER_SEQUENCE_NUMBER", continuation)
        if records:
            self.last = int(records[-1].sequence_number)
        if records or at_end:
            behind = body.get("MillisBehindLatest")
            millis = None if behind is None else float(behind)
            self._put(Batch(self.read.shard_id, self.read.holding, records, at_end, millis))
        return at_end

    def _put(self, batch: Batch) -> None:
        cond = self.reader._cond
        with cond:
            while self.buffered >= self.reader.buffer_records and not self.stopped.is_set():
                cond.wait(0.5)
            if self.stopped.is_set():
                return
            self.buffer.append(batch)
            self.buffered += len(batch.records)
            cond.notify_all()


def _record(stream: str, shard_id: str, raw: dict[str, Any]) -> Record:
    return Record(stream, shard_id, raw["SequenceNumber"], raw["PartitionKey"], raw["Data"])


def _delivered_before(start: Position) -> int | None:
    """The last sequence number a holding starting here counts as delivered."""
    if start.sequence_number is None:
        return None
    number = int(start.sequence_number)
    return number if start.kind == "AFTER_SEQUENCE_NUMBER" else number - 1


def _abort(stream: Any) -> None:
    """Close an event stream, shutting its socket down so a thread blocked reading it wakes."""
    raw = getattr(stream, "_raw_stream", None)
    shutdown = getattr(raw, "shutdown", None)  # urllib3 >= 2.3
    with contextlib.suppress(Exception):
        if callable(shutdown):
            shutdown()
    with contextlib.suppress(Exception):
        stream.close()


class FanOutSource(KinesisSource):
    """A `KinesisSource` reading its held shards with enhanced fan-out."""

    def __init__(
        self,
        kinesis: Any,
        leases: LeaseTable,
        *,
        stream: str,
        group: str,
        worker_id: str,
        consumer_arn: str,
        lease_ms: int = 10_000,
        on_shard_lost: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        buffer_records: int = DEFAULT_BUFFER_RECORDS,
        max_wait_s: float = 0.2,
        checkpoint_interval_s: float = 0.0,
    ) -> None:
        reader = FanOutReader(
            kinesis,
            stream,
            consumer_arn,
            buffer_records=buffer_records,
            max_wait_s=max_wait_s,
            metrics=metrics,
        )
        super().__init__(
            kinesis,
            leases,
            stream=stream,
            group=group,
            worker_id=worker_id,
            lease_ms=lease_ms,
            on_shard_lost=on_shard_lost,
            metrics=metrics,
            clock=clock,
            reader=reader,
            checkpoint_interval_s=checkpoint_interval_s,
        )


def register_consumer(
    kinesis: Any,
    stream: str,
    name: str,
    *,
    timeout_s: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> str:
    """The ARN of `stream`'s consumer `name`, registered if absent, once it is ACTIVE.

    Idempotent, and safe when many instances start at once: an existing
    consumer is described, never registered again; one being created or
    deleted is waited for. Raises ConfigurationFault if it is not ACTIVE
    within `timeout_s`, or for errors no retry mends (access denied, no stream).
    """
    what = f"fan-out consumer {name} of {stream}"
    try:
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    except (ClientError, BotoCoreError) as e:
        raise classify(e, what=what) from e
    stream_arn = summary["StreamARN"]
    deadline = clock() + timeout_s
    delay = 0.2
    while True:
        status, arn = _consumer_status(kinesis, stream_arn, name, what)
        if status == "ACTIVE" and arn is not None:
            return arn
        if status is None:
            _register(kinesis, stream_arn, name, what)
        if clock() >= deadline:
            raise ConfigurationFault(f"{what} not ACTIVE within {timeout_s:.0f} s ({status})")
        sleep(delay)
        delay = min(2 * delay, 5.0)


def _consumer_status(
    kinesis: Any, stream_arn: str, name: str, what: str
) -> tuple[str | None, str | None]:
    try:
        description = kinesis.describe_stream_consumer(StreamARN=stream_arn, ConsumerName=name)[
            "ConsumerDescription"
        ]
    except ClientError as e:
        if error_code(e) == "ResourceNotFoundException":
            return None, None
        if outcome(e) is Outcome.RETRY:
            return "UNKNOWN", None
        raise classify(e, what=what) from e
    return description["ConsumerStatus"], description["ConsumerARN"]


def _register(kinesis: Any, stream_arn: str, name: str, what: str) -> None:
    try:
        kinesis.register_stream_consumer(StreamARN=stream_arn, ConsumerName=name)
        log.info("registered %s", what)
    except ClientError as e:
        # ResourceInUseException: another instance registered it first; throttling: later.
        if outcome(e) is not Outcome.RETRY:
            raise classify(e, what=what) from e
