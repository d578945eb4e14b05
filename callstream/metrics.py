"""Service metrics: counters and gauges, as CloudWatch EMF on AWS and Prometheus text locally.

One call wires a service: `metrics = start_observability("transcriber", port)`.
Then `metrics.count(SEGMENTS)`, `metrics.gauge(ITERATOR_AGE_MS, ms, shard="shardId-0")`.

- EMF (`CALLSTREAM_METRICS=emf`, the default when running on ECS or Lambda): every
  `CALLSTREAM_METRICS_INTERVAL_S` (60) one JSON line per label set is printed to
  stdout; CloudWatch Logs turns it into metrics in namespace `callstream`,
  dimensions `Service` (+ the labels). Counters are the increase since the last
  line, plus `<name>_per_second`.
- Prometheus (`prometheus`, the default elsewhere): `/metrics` of the health
  server (`callstream.health`) renders the text exposition format.
- `off`: nothing is emitted (the calls still work).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from callstream.health import HealthServer

log = logging.getLogger(__name__)

# The names every service uses, so dashboards and alarms line up.
ITERATOR_AGE_MS = "iterator_age_ms"  # gauge, label shard: MillisBehindLatest of the last read
CALLS_IN_PROGRESS = "calls_in_progress"  # gauge
CHUNKS = "audio_chunks"  # counter: AudioChunkCaptured handled or published
SEGMENTS = "transcript_segments"  # counter, label kind=partial|final
ERRORS = "errors"  # counter, label type
DEAD_LETTERS = "dead_letters"  # counter
RECORDS = "records_processed"  # counter, label shard: records read and handled
LEASES_FENCED = "leases_fenced"  # counter, label shard: leases dropped, renewal overdue
SHARDS_PAUSED = "shards_paused"  # gauge: shards waiting for a writer schema this consumer lacks
CONFIGURATION_FAULTS = "configuration_faults"  # counter: ConfigurationFaults that stopped a loop
NAMESPACE = "callstream"
MODES = ("emf", "prometheus", "off")

Labels = tuple[tuple[str, str], ...]


def default_mode(environ: Mapping[str, str] | None = None) -> str:
    """`CALLSTREAM_METRICS`, else emf on ECS/Lambda, else prometheus."""
    env = os.environ if environ is None else environ
    chosen = env.get("CALLSTREAM_METRICS", "").strip().lower()
    if chosen:
        if chosen not in MODES:
            raise ValueError(
                f"CALLSTREAM_METRICS must be one of {', '.join(MODES)}, got {chosen!r}"
            )
        return chosen
    on_aws = "ECS_CONTAINER_METADATA_URI_V4" in env or "AWS_LAMBDA_FUNCTION_NAME" in env
    return "emf" if on_aws else "prometheus"


class Metrics:
    """Thread-safe counters and gauges of one service."""

    def __init__(
        self,
        service: str,
        mode: str = "prometheus",
        out: TextIO | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"metrics mode must be one of {MODES}, got {mode!r}")
        self.service = service
        self.mode = mode
        self.out = out
        self.clock = clock
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._flushed: dict[tuple[str, Labels], float] = {}
        self._last_flush = clock()
        self.flusher: EmfFlusher | None = None
        self.health: HealthServer | None = None

    def stop(self) -> None:
        """Stop the EMF flusher (flushing once more) and the health server, if started."""
        if self.flusher is not None:
            self.flusher.stop()
            self.flusher = None
        if self.health is not None:
            self.health.stop()
            self.health = None

    def count(self, name: str, n: float = 1, **labels: str) -> None:
        """Add `n` to a counter."""
        key = (name, _labels(labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + n

    def gauge(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge to its current value."""
        with self._lock:
            self._gauges[(name, _labels(labels))] = value

    def value(self, name: str, **labels: str) -> float | None:
        """A counter's total or a gauge's value (None if never set)."""
        key = (name, _labels(labels))
        with self._lock:
            return self._counters.get(key, self._gauges.get(key))

    def prometheus(self) -> str:
        """The Prometheus text exposition format of every metric."""
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
        lines: list[str] = []
        for kind, values, suffix in (("counter", counters, "_total"), ("gauge", gauges, "")):
            for name in sorted({n for n, _ in values}):
                full = f"{NAMESPACE}_{name}{suffix}"
                lines.append(f"# TYPE {full} {kind}")
                for (metric, labels), value in sorted(values.items()):
                    if metric == name:
                        lines.append(f"{full}{_prom_labels(self.service, labels)} {_num(value)}")
        return "\n".join(lines) + "\n"

    def emf_lines(self) -> list[str]:
        """One EMF JSON document per label set: counter increases since the last call, gauges."""
        now = self.clock()
        with self._lock:
            elapsed = max(now - self._last_flush, 1e-9)
            self._last_flush = now
            groups: dict[Labels, dict[str, tuple[float, str]]] = {}
            for key, total in self._counters.items():
                delta = total - self._flushed.get(key, 0)
                self._flushed[key] = total
                group = groups.setdefault(key[1], {})
                group[key[0]] = (delta, "Count")
                group[f"{key[0]}_per_second"] = (delta / elapsed, "Count/Second")
            for (name, labels), value in self._gauges.items():
                unit = "Milliseconds" if name.endswith("_ms") else "None"
                groups.setdefault(labels, {})[name] = (value, unit)
        return [self._emf(labels, values, now) for labels, values in sorted(groups.items())]

    def flush(self) -> None:
        """Print the EMF lines (mode emf only)."""
        if self.mode != "emf":
            return
        out = self.out or sys.stdout
        for line in self.emf_lines():
            out.write(line + "\n")
        out.flush()

    def _emf(self, labels: Labels, values: dict[str, tuple[float, str]], now: float) -> str:
        dimensions = ["Service", *[name for name, _ in labels]]
        document: dict[str, object] = {
            "_aws": {
                "Timestamp": int(now * 1000),
                "CloudWatchMetrics": [
                    {
                        "Namespace": NAMESPACE,
                        "Dimensions": [dimensions],
                        "Metrics": [{"Name": n, "Unit": u} for n, (_, u) in sorted(values.items())],
                    }
                ],
            },
            "Service": self.service,
            **dict(labels),
            **{name: value for name, (value, _) in values.items()},
        }
        return json.dumps(document, separators=(",", ":"))


class EmfFlusher:
    """A daemon thread that flushes EMF lines every `interval_s` until stopped."""

    def __init__(self, metrics: Metrics, interval_s: float) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="emf-flush", daemon=True)

    def start(self) -> EmfFlusher:
        """Begin flushing."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Flush once more and stop."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.metrics.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.metrics.flush()
            except (OSError, ValueError):
                log.warning("EMF flush failed", exc_info=True)


def start_observability(
    service: str,
    port: int | None = None,
    ready: Callable[[], bool] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Metrics:
    """Metrics for `service`, an EMF flusher on AWS, and the health server if a port is given.

    `port` (or `CALLSTREAM_HEALTH_PORT`) serves /healthz, /readyz and /metrics on
    127.0.0.1 (0: any free port; see `metrics.health.port`). `ready` answers /readyz.
    """
    env = os.environ if environ is None else environ
    metrics = Metrics(service, default_mode(env))
    interval = float(env.get("CALLSTREAM_METRICS_INTERVAL_S", "60"))
    metrics.flusher = EmfFlusher(metrics, interval).start() if metrics.mode == "emf" else None
    if port is None and env.get("CALLSTREAM_HEALTH_PORT"):
        port = int(env["CALLSTREAM_HEALTH_PORT"])
    if port is not None:
        from callstream.health import HealthServer

        metrics.health = HealthServer(metrics, port, ready).start()
    return metrics


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _prom_labels(service: str, labels: Labels) -> str:
    pairs = [("service", service), *labels]
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
