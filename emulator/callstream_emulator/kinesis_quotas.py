"""Kinesis Data Streams' per-shard quotas, as the embedded emulator enforces them.

The figures are AWS's ("Quotas and limits", Amazon Kinesis Data Streams
developer guide), per shard:
- writes: 1 MiB/s (data blob + partition key) or 1,000 records/s, whichever
  is hit first; PutRecords fails the entries over it one by one, PutRecord
  fails whole (`ProvisionedThroughputExceededException`);
- polling reads: 5 GetRecords calls/s and 2 MiB/s, shared by every consumer
  of the shard; one call returns at most 10,000 records and 10 MiB;
- enhanced fan-out: 2 MiB/s per registered consumer per shard, pushed over
  SubscribeToShard; one SubscribeToShard call per second per consumer and shard.

Each rate is a token bucket that holds one second's worth and refills
continuously, so a short burst up to one second's capacity passes, as AWS's
own burst allowance lets it. A read is charged after it returns: a big
GetRecords may take the byte bucket below zero, and calls are refused until
it has refilled (AWS: "if a call returns 10 MiB, subsequent calls made within
the next 5 seconds throw an exception"). A write of a record bigger than the
bucket passes when the bucket is full, as the quota allows a record of up to
the maximum record size.

Pure bookkeeping: no moto, no HTTP. `moto_patches` and `kinesis_fanout` ask
it; the emulator's control route shows `snapshot()` (throttle counters per
operation, stream and shard; usage per shard) and switches it with `configure()`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
WRITE_BYTES_PER_S = 1 * MIB
WRITE_RECORDS_PER_S = 1000
READ_CALLS_PER_S = 5
READ_BYTES_PER_S = 2 * MIB
MAX_RECORDS_PER_GET = 10_000
MAX_BYTES_PER_GET = 10 * MIB
FANOUT_BYTES_PER_S = 2 * MIB
SUBSCRIBE_CALLS_PER_S = 1

LIMITS = {
    "write_bytes_per_s": WRITE_BYTES_PER_S,
    "write_records_per_s": WRITE_RECORDS_PER_S,
    "read_calls_per_s": READ_CALLS_PER_S,
    "read_bytes_per_s": READ_BYTES_PER_S,
    "max_records_per_get": MAX_RECORDS_PER_GET,
    "max_bytes_per_get": MAX_BYTES_PER_GET,
    "fanout_bytes_per_s": FANOUT_BYTES_PER_S,
    "subscribe_calls_per_s": SUBSCRIBE_CALLS_PER_S,
}

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens per second, holding at most one second's worth; starts full."""

    def __init__(self, rate: float, clock: Clock) -> None:
        self.rate = rate
        self.capacity = rate
        self._clock = clock
        self._level = rate
        self._at = clock()

    def level(self) -> float:
        """Tokens available now (negative after an overdraft)."""
        now = self._clock()
        elapsed = max(0.0, now - self._at)  # a clock swapped by a test may step back
        self._level = min(self.capacity, self._level + elapsed * self.rate)
        self._at = now
        return self._level

    def can_take(self, amount: float) -> bool:
        """Whether `amount` may be taken now (more than capacity: when full)."""
        return self.level() >= min(amount, self.capacity)

    def debit(self, amount: float) -> None:
        """Take `amount`, even below zero."""
        self.level()
        self._level -= amount

    def wait_s(self, amount: float) -> float:
        """Seconds until `can_take(amount)` holds."""
        missing = min(amount, self.capacity) - self.level()
        return max(0.0, missing / self.rate)


@dataclass
class _ShardBuckets:
    write_bytes: TokenBucket
    write_records: TokenBucket
    read_calls: TokenBucket
    read_bytes: TokenBucket


def stream_label(stream_arn: str) -> str:
    """The stream's name, from its ARN (what the counters show)."""
    return stream_arn.split("/", 1)[-1] if "/" in stream_arn else stream_arn


class KinesisQuotas:
    """Per-shard token buckets, throttle counters and usage totals; thread-safe.

    `enabled` False lets everything through (usage is still counted). `clock`
    is monotonic seconds; a test may swap it (every bucket reads it on each use).
    """

    def __init__(self, enabled: bool = True, clock: Clock = time.monotonic) -> None:
        self.default_enabled = enabled
        self.enabled = enabled
        self.clock = clock
        self._lock = threading.Lock()
        self._shards: dict[tuple[str, str], _ShardBuckets] = {}
        self._fanout: dict[tuple[str, str], TokenBucket] = {}
        self._subscribe: dict[tuple[str, str], TokenBucket] = {}
        self._throttles: Counter[tuple[str, str, str]] = Counter()
        self._usage: Counter[tuple[str, str, str]] = Counter()

    # -- writes -------------------------------------------------------------------

    def admit_write(self, stream_arn: str, shard_id: str, size: int, operation: str) -> bool:
        """Take one record of `size` bytes from the shard's write buckets, or count a throttle."""
        with self._lock:
            buckets = self._buckets(stream_arn, shard_id)
            if self.enabled and not (
                buckets.write_records.can_take(1) and buckets.write_bytes.can_take(size)
            ):
                self._throttles[(operation, stream_label(stream_arn), shard_id)] += 1
                return False
            buckets.write_records.debit(1)
            buckets.write_bytes.debit(size)
            self._use(stream_arn, shard_id, "records_written", 1)
            self._use(stream_arn, shard_id, "bytes_written", size)
            return True

    # -- polling reads ------------------------------------------------------------

    def admit_read(self, stream_arn: str, shard_id: str) -> bool:
        """Take one GetRecords call from the shard's shared budget, or count a throttle."""
        with self._lock:
            buckets = self._buckets(stream_arn, shard_id)
            if self.enabled and (
                buckets.read_bytes.level() <= 0 or not buckets.read_calls.can_take(1)
            ):
                self._throttles[("GetRecords", stream_label(stream_arn), shard_id)] += 1
                return False
            buckets.read_calls.debit(1)
            self._use(stream_arn, shard_id, "get_records_calls", 1)
            return True

    def charge_read(self, stream_arn: str, shard_id: str, size: int) -> None:
        """Charge the bytes a GetRecords returned to the shard's read budget."""
        with self._lock:
            self._buckets(stream_arn, shard_id).read_bytes.debit(size)
            self._use(stream_arn, shard_id, "bytes_read", size)

    # -- enhanced fan-out ---------------------------------------------------------

    def admit_subscribe(self, consumer_arn: str, stream_arn: str, shard_id: str) -> bool:
        """One SubscribeToShard per second per consumer and shard, or count a throttle."""
        with self._lock:
            key = (consumer_arn, shard_id)
            bucket = self._subscribe.get(key)
            if bucket is None:
                bucket = self._subscribe[key] = TokenBucket(SUBSCRIBE_CALLS_PER_S, self._now)
            if self.enabled and not bucket.can_take(1):
                self._throttles[("SubscribeToShard", stream_label(stream_arn), shard_id)] += 1
                return False
            bucket.debit(1)
            return True

    def fanout_allowance(self, consumer_arn: str, shard_id: str) -> float:
        """Bytes this consumer may have pushed from the shard now (inf when off; <= 0: wait)."""
        with self._lock:
            if not self.enabled:
                return float("inf")
            return self._fanout_bucket(consumer_arn, shard_id).level()

    def fanout_wait_s(self, consumer_arn: str, shard_id: str) -> float:
        """Seconds before this consumer's subscription to the shard may push again."""
        with self._lock:
            if not self.enabled:
                return 0.0
            return self._fanout_bucket(consumer_arn, shard_id).wait_s(1)

    def charge_fanout(self, consumer_arn: str, stream_arn: str, shard_id: str, size: int) -> None:
        """Charge bytes pushed to a consumer against its own 2 MiB/s on the shard."""
        with self._lock:
            self._fanout_bucket(consumer_arn, shard_id).debit(size)
            self._use(stream_arn, shard_id, "bytes_pushed", size)

    # -- control ------------------------------------------------------------------

    def configure(self, *, enabled: bool | None = None, reset_counters: bool = False) -> None:
        """Switch enforcement on or off; optionally zero the counters."""
        with self._lock:
            if enabled is not None:
                self.enabled = bool(enabled)
            if reset_counters:
                self._throttles.clear()
                self._usage.clear()

    def restore_default(self) -> None:
        """Back to the constructor's `enabled` (the emulator's faults.clear() calls this)."""
        with self._lock:
            self.enabled = self.default_enabled

    def throttle_count(self, operation: str | None = None) -> int:
        """Throttles so far, of one operation or all."""
        with self._lock:
            return sum(n for (op, _, _), n in self._throttles.items() if operation in (None, op))

    def snapshot(self) -> dict[str, Any]:
        """Enforcement, limits, throttles per operation/stream/shard and usage, JSON-ready."""
        with self._lock:
            throttles = [
                {"operation": op, "stream": stream, "shard": shard, "count": count}
                for (op, stream, shard), count in sorted(self._throttles.items())
            ]
            usage: dict[str, dict[str, int]] = {}
            for (stream, shard, what), amount in sorted(self._usage.items()):
                usage.setdefault(f"{stream}/{shard}", {})[what] = amount
            totals: Counter[str] = Counter()
            for (op, _, _), count in self._throttles.items():
                totals[op] += count
            return {
                "enabled": self.enabled,
                "limits": dict(LIMITS),
                "throttles": throttles,
                "throttle_totals": dict(sorted(totals.items())),
                "usage": usage,
            }

    def metrics_text(self) -> str:
        """Throttles and usage as Prometheus counters (text exposition format)."""
        snapshot = self.snapshot()
        lines = [
            "# HELP callstream_emulator_kinesis_throttles_total Requests (PutRecords: entries) "
            "the emulator's per-shard quotas refused.",
            "# TYPE callstream_emulator_kinesis_throttles_total counter",
        ]
        for entry in snapshot["throttles"]:
            labels = _labels(
                operation=entry["operation"], stream=entry["stream"], shard=entry["shard"]
            )
            lines.append(
                f"callstream_emulator_kinesis_throttles_total{{{labels}}} {entry['count']}"
            )
        lines += [
            "# HELP callstream_emulator_kinesis_usage_total Records, bytes and calls per shard.",
            "# TYPE callstream_emulator_kinesis_usage_total counter",
        ]
        for key, amounts in snapshot["usage"].items():
            stream, _, shard = key.rpartition("/")
            for what, amount in amounts.items():
                labels = _labels(stream=stream, shard=shard, what=what)
                lines.append(f"callstream_emulator_kinesis_usage_total{{{labels}}} {amount}")
        enabled = 1 if snapshot["enabled"] else 0
        lines += [
            "# TYPE callstream_emulator_kinesis_quotas_enabled gauge",
            f"callstream_emulator_kinesis_quotas_enabled {enabled}",
        ]
        return "\n".join(lines) + "\n"

    # -- internals (lock held) ----------------------------------------------------

    def _buckets(self, stream_arn: str, shard_id: str) -> _ShardBuckets:
        key = (stream_arn, shard_id)
        buckets = self._shards.get(key)
        if buckets is None:
            clock = self._now
            buckets = self._shards[key] = _ShardBuckets(
                TokenBucket(WRITE_BYTES_PER_S, clock),
                TokenBucket(WRITE_RECORDS_PER_S, clock),
                TokenBucket(READ_CALLS_PER_S, clock),
                TokenBucket(READ_BYTES_PER_S, clock),
            )
        return buckets

    def _fanout_bucket(self, consumer_arn: str, shard_id: str) -> TokenBucket:
        key = (consumer_arn, shard_id)
        bucket = self._fanout.get(key)
        if bucket is None:
            bucket = self._fanout[key] = TokenBucket(FANOUT_BYTES_PER_S, self._now)
        return bucket

    def _now(self) -> float:
        return self.clock()

    def _use(self, stream_arn: str, shard_id: str, what: str, amount: int) -> None:
        self._usage[(stream_label(stream_arn), shard_id, what)] += amount


def _labels(**values: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return ",".join(f'{name}="{escape(value)}"' for name, value in values.items())
