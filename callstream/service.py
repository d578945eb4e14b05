"""Wiring shared by every service's `main.py`: clients, streams, the loop, signals.

Each `main.py` builds its settings and handler, then calls `run_service`.
SIGTERM/SIGINT stop the loop after the current record: it flushes,
checkpoints and releases its leases so another instance takes over at once.
A `ConfigurationFault` stops it the same way, then exits with status 3.

`CALLSTREAM_LEASE_MS` (default 10000) is how long a lease lives without a
heartbeat: an instance killed with SIGKILL is taken over within about
4/3 of it (expiry plus one balancing period).

`CALLSTREAM_READ_MODE` picks how the leased shards are read (`record_source`):
`polling` (GetRecords, each shard at most once per `groups / 5` s, since the
groups reading a shard share its 5 reads per second; `CALLSTREAM_POLL_GROUPS`)
or `efo` (enhanced fan-out through `CALLSTREAM_EFO_CONSUMER_ARN`, else the
consumer named after the service, registered if absent). docs/capacity.md
says which fits which service and what each costs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from callstream import aws
from callstream.bus.consumer import KinesisSource
from callstream.bus.fanout import FanOutSource, register_consumer
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable, lease_client
from callstream.bus.polling import PollingReader, read_interval_s
from callstream.config import BusSettings, Env
from callstream.errors import ConfigError, ConfigurationFault
from callstream.metrics import Metrics, start_observability
from callstream.runtime import Handler, ServiceLoop

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_LEASE_MS = 10_000
CHECKPOINT_INTERVAL_S = 1.0  # a shard's checkpoint is written at most once a second
EXIT_CONFIGURATION_FAULT = 3  # access denied, a missing table, stream or bucket (docs/errors.md)


def lease_ms(environ: dict[str, str] | None = None) -> int:
    """The lease duration from `CALLSTREAM_LEASE_MS` (1 s .. 10 min)."""
    return Env(environ).integer("CALLSTREAM_LEASE_MS", DEFAULT_LEASE_MS, 1000, 600_000)


def load_settings(factory: Callable[[], T]) -> T:
    """Read settings; a bad value stops the process with a message naming the variable."""
    try:
        return factory()
    except ConfigError as e:
        log.critical("configuration error: %s", e)
        print(f"configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def ensure_stream(kinesis: Any, name: str, shards: int = 1) -> None:
    """Create a stream if absent and wait until it is active."""
    try:
        kinesis.describe_stream_summary(StreamName=name)
    except kinesis.exceptions.ResourceNotFoundException:
        with contextlib.suppress(kinesis.exceptions.ResourceInUseException):
            kinesis.create_stream(StreamName=name, ShardCount=shards)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)


def publisher(bus: BusSettings, stream: str) -> KinesisPublisher:
    """A publisher to one of the bus's streams."""
    return KinesisPublisher(
        aws.client("kinesis", bus.region), stream, deadline_s=bus.publish_deadline_s
    )


def record_source(
    service: str,
    bus: BusSettings,
    stream: str,
    leases: LeaseTable,
    *,
    lease_ms: int,
    on_shard_lost: Callable[[str], None],
    metrics: Metrics,
) -> KinesisSource:
    """The leased source `CALLSTREAM_READ_MODE` asks for: polling within the shard's shared
    read budget (an interval for `bus.polling_groups(stream)` groups), or enhanced fan-out
    through the configured consumer ARN, else the consumer named for the service (registered
    if absent). Its client does not retry: the readers back off per shard themselves."""
    reads = aws.client("kinesis", bus.region, retries={"mode": "standard", "total_max_attempts": 1})
    common: dict[str, Any] = {
        "stream": stream,
        "group": service,
        "worker_id": bus.worker_id,
        "lease_ms": lease_ms,
        "on_shard_lost": on_shard_lost,
        "metrics": metrics,
        "checkpoint_interval_s": CHECKPOINT_INTERVAL_S,
    }
    if bus.read_mode == "efo":
        arn = bus.efo_consumer_arn or register_consumer(
            aws.client("kinesis", bus.region), stream, bus.efo_consumer_name or service
        )
        log.info("reading %s with enhanced fan-out as %s", stream, arn, extra={"stream": stream})
        return FanOutSource(reads, leases, consumer_arn=arn, **common)
    groups = bus.polling_groups(stream)
    interval = read_interval_s(groups, bus.poll_interval_ms / 1000)
    log.info(
        "polling %s every %.2f s per shard (%d groups share its reads)",
        stream,
        interval,
        groups,
        extra={"stream": stream},
    )
    reader = PollingReader(reads, stream, interval_s=interval, metrics=metrics)
    return KinesisSource(reads, leases, reader=reader, **common)


def run_service(
    service: str,
    bus: BusSettings,
    stream: str,
    handler: Handler,
    metrics: Metrics | None = None,
) -> None:
    """Consume `stream` with `handler` until SIGTERM/SIGINT.

    `metrics`: the set the handler counts into, made by `start_observability`, so that
    the loop's counters and the handler's are one set (one /metrics, one EMF line); by
    default the loop makes its own. Readiness (/readyz) is "holds a shard" either way;
    the set is stopped when the loop ends."""
    kinesis = aws.client("kinesis", bus.region)
    lease_duration = load_settings(lease_ms)
    # Its own client: a renewal answers within a lease or fails (then the fence acts).
    leases = LeaseTable(lease_client(bus.region, lease_duration), bus.lease_table)
    leases.ensure_table()
    ensure_stream(kinesis, stream)
    ensure_stream(kinesis, bus.deadletter_stream)
    loop: ServiceLoop | None = None
    if metrics is None:
        metrics = start_observability(service, ready=lambda: bool(source.held_shards))
    elif metrics.health is not None:
        metrics.health.ready = lambda: bool(source.held_shards)
    try:
        source = record_source(
            service,
            bus,
            stream,
            leases,
            lease_ms=lease_duration,
            on_shard_lost=lambda shard: loop.shard_lost(shard) if loop else None,
            metrics=metrics,
        )
    except ConfigurationFault as e:  # the fan-out consumer cannot be registered or found
        metrics.stop()
        print(f"{service} stopped by a configuration fault: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIGURATION_FAULT) from e
    loop = ServiceLoop(
        service,
        source,
        handler,
        KinesisPublisher(kinesis, bus.deadletter_stream),
        # A fan-out poll already waits for records to arrive; a polled one sleeps until
        # its shards are due, so the loop's own wait only spaces polls of nothing held.
        poll_interval_s=0.0 if bus.read_mode == "efo" else bus.poll_interval_ms / 1000,
        metrics=metrics,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("consuming %s as %s", stream, bus.worker_id, extra={"stream": stream})
    try:
        loop.run(stop)
    except ConfigurationFault as e:  # leases released; a restart meets it again until fixed
        print(f"{service} stopped by a configuration fault: {e}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIGURATION_FAULT) from e
    finally:
        metrics.stop()
    log.info("stopped")
