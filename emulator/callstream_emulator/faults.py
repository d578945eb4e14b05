"""Injected failures of the embedded emulator, switchable at run time.

One `Faults` object is shared by the moto patches (Kinesis throttling) and the
KVS media endpoint (cut GetMedia connections, expired data endpoints). Tests
in the emulator's process use it directly (`emulator.faults`); another
process posts the same settings as JSON to the media endpoint's control
route, `POST {CALLSTREAM_EMULATOR_CONTROL_URL}/faults` (see `remote_faults`):

    {"clear": true,
     "kinesis_throttle": {"share": 0.3, "seed": 7,
                          "operations": ["PutRecord", "PutRecords", "GetRecords"],
                          "partial_put_records": false},
     "dynamodb_throttle": {"share": 0.2, "seed": 7, "operations": ["PutItem", ...],
                           "partial_batch_writes": true},
     "s3_throttle": {"share": 0.2, "seed": 7, "operations": ["PutObject"]},
     "cut_get_media": {"after_fragments": 2, "after_bytes": null,
                       "stream": "name-or-arn", "connections": 1},
     "expire_data_endpoints": true,
     "kinesis_quotas": {"enabled": false, "reset_counters": false},
     "kinesis_fanout": {"subscription_s": 10, "idle_event_s": 5,
                        "consumer_activation_s": 0.5}}

`clear` runs first; every key is optional. The reply is `snapshot()`, which
also carries the Kinesis quotas' throttle counters (`kinesis_quotas.throttles`).

The last two are not faults but the emulator's Kinesis realism: per-shard
quotas (`kinesis_quotas.KinesisQuotas`, on by default) and enhanced fan-out
settings (`kinesis_fanout.FanoutSettings`). `clear` puts both back to how the
Emulator was started (throttle counters are kept).

Expired data endpoints: GetDataEndpoint hands out
`http://127.0.0.1:<media-port>/gen/<generation>`; every media request carries
that generation in its path. `expire_data_endpoints()` bumps the current
generation, after which requests with an older one are refused with HTTP 403
and error code `InvalidEndpointException` (real KVS documents that code, with
HTTP 400, for "call GetDataEndpoint again"). Requests without a `/gen/` prefix
never expire.
"""

from __future__ import annotations

import json
import random
import threading
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from callstream_emulator.kinesis_fanout import FanoutSettings
    from callstream_emulator.kinesis_quotas import KinesisQuotas

KINESIS_THROTTLED_OPERATIONS = ("PutRecord", "PutRecords", "GetRecords")
DYNAMODB_THROTTLED_OPERATIONS = (
    "PutItem",
    "BatchWriteItem",
    "UpdateItem",
    "GetItem",
    "Query",
    "Scan",
)
S3_THROTTLED_OPERATIONS = ("PutObject", "HeadObject", "GetObject")
EXPIRED_ENDPOINT_STATUS = 403
EXPIRED_ENDPOINT_ERROR = "InvalidEndpointException"
_SPEC_KEYS = frozenset(
    {
        "clear",
        "kinesis_throttle",
        "dynamodb_throttle",
        "s3_throttle",
        "cut_get_media",
        "expire_data_endpoints",
        "kinesis_quotas",
        "kinesis_fanout",
    }
)


class _Throttle:
    """A seeded share of one service's requests to refuse (not thread-safe on its own)."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.allowed = allowed
        self.rng = random.Random(0)
        self.share = 0.0
        self.operations: frozenset[str] = frozenset(allowed)
        self.partial = False

    def set(self, share: float, seed: int, operations: Iterable[str], partial: bool) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"throttle share must be within 0..1, got {share}")
        unknown = set(operations) - set(self.allowed)
        if unknown:
            raise ValueError(f"cannot throttle {sorted(unknown)}; only {', '.join(self.allowed)}")
        self.rng = random.Random(seed)
        self.share = share
        self.operations = frozenset(operations)
        self.partial = partial

    def draw(self, operation: str) -> bool:
        if self.share <= 0.0 or operation not in self.operations:
            return False
        return self.rng.random() < self.share

    def snapshot(self) -> dict[str, Any]:
        return {"share": self.share, "operations": sorted(self.operations), "partial": self.partial}


@dataclass
class GetMediaCut:
    """Abort a GetMedia response after this many fragments and/or body bytes."""

    after_fragments: int | None = None
    after_bytes: int | None = None
    stream: str | None = None  # name or ARN; None = any stream
    connections: int | None = 1  # GetMedia connections still to cut; None = all


class Faults:
    """Thread-safe switchboard of injected failures; everything off by default.

    `kinesis_quotas` and `fanout` (optional) are the emulator's Kinesis quota
    and fan-out settings, exposed and switched through the same control route.
    """

    def __init__(
        self,
        kinesis_quotas: KinesisQuotas | None = None,
        fanout: FanoutSettings | None = None,
    ) -> None:
        self.kinesis_quotas = kinesis_quotas
        self.fanout = fanout
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self._throttle_share = 0.0
        self._throttle_ops: frozenset[str] = frozenset(KINESIS_THROTTLED_OPERATIONS)
        self._partial_put_records = False
        self._cuts: list[GetMediaCut] = []
        self._generation = 1
        self._dynamodb = _Throttle(DYNAMODB_THROTTLED_OPERATIONS)
        self._s3 = _Throttle(S3_THROTTLED_OPERATIONS)

    def throttle_kinesis(
        self,
        share: float,
        *,
        seed: int = 0,
        operations: Iterable[str] = KINESIS_THROTTLED_OPERATIONS,
        partial_put_records: bool = False,
    ) -> None:
        """Answer `share` (0..1) of Kinesis requests with ProvisionedThroughputExceeded.

        The draw uses a `random.Random(seed)`, so a run is repeatable. With
        `partial_put_records`, PutRecords succeeds but fails each record with
        the same share (FailedRecordCount), as real Kinesis mostly does.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"throttle share must be within 0..1, got {share}")
        unknown = set(operations) - set(KINESIS_THROTTLED_OPERATIONS)
        if unknown:
            allowed = ", ".join(KINESIS_THROTTLED_OPERATIONS)
            raise ValueError(f"cannot throttle {sorted(unknown)}; only {allowed}")
        with self._lock:
            self._rng = random.Random(seed)
            self._throttle_share = share
            self._throttle_ops = frozenset(operations)
            self._partial_put_records = partial_put_records

    def kinesis_throttled(self, operation: str) -> bool:
        """Draw whether this Kinesis request (or PutRecords entry) is throttled."""
        with self._lock:
            if self._throttle_share <= 0.0 or operation not in self._throttle_ops:
                return False
            return self._rng.random() < self._throttle_share

    @property
    def partial_put_records(self) -> bool:
        """Whether PutRecords throttles per record instead of per request."""
        return self._partial_put_records

    def throttle_dynamodb(
        self,
        share: float,
        *,
        seed: int = 0,
        operations: Iterable[str] = DYNAMODB_THROTTLED_OPERATIONS,
        partial_batch_writes: bool = True,
    ) -> None:
        """Answer `share` of DynamoDB requests with ProvisionedThroughputExceededException.

        With `partial_batch_writes`, BatchWriteItem succeeds but leaves each
        item unprocessed with the same share (UnprocessedItems), as real
        DynamoDB does under load. Seeded like `throttle_kinesis`.
        """
        with self._lock:
            self._dynamodb.set(share, seed, operations, partial_batch_writes)

    def dynamodb_throttled(self, operation: str) -> bool:
        """Draw whether this DynamoDB request (or BatchWriteItem item) is throttled."""
        with self._lock:
            return self._dynamodb.draw(operation)

    @property
    def partial_batch_writes(self) -> bool:
        """Whether BatchWriteItem throttles per item (UnprocessedItems) instead of per request."""
        return self._dynamodb.partial

    def throttle_s3(
        self, share: float, *, seed: int = 0, operations: Iterable[str] = S3_THROTTLED_OPERATIONS
    ) -> None:
        """Answer `share` of S3 object requests with HTTP 503 SlowDown (seeded)."""
        with self._lock:
            self._s3.set(share, seed, operations, False)

    def s3_throttled(self, operation: str) -> bool:
        """Draw whether this S3 request is throttled."""
        with self._lock:
            return self._s3.draw(operation)

    def cut_get_media(
        self,
        *,
        after_fragments: int | None = None,
        after_bytes: int | None = None,
        stream: str | None = None,
        connections: int | None = 1,
    ) -> None:
        """Abort the next `connections` GetMedia responses (None: all) mid-stream.

        The server sends `after_fragments` whole fragments and/or `after_bytes`
        body bytes, whichever comes first, then closes the socket without
        ending the chunked body, so the client sees a broken stream.
        """
        if after_fragments is None and after_bytes is None:
            raise ValueError("cut_get_media needs after_fragments and/or after_bytes")
        with self._lock:
            self._cuts.append(GetMediaCut(after_fragments, after_bytes, stream, connections))

    def take_get_media_cut(self, stream_name: str, stream_arn: str) -> GetMediaCut | None:
        """The cut that applies to a new GetMedia connection, consuming one use."""
        with self._lock:
            for cut in self._cuts:
                if cut.stream not in (None, stream_name, stream_arn):
                    continue
                if cut.connections is not None:
                    cut.connections -= 1
                    if cut.connections <= 0:
                        self._cuts.remove(cut)
                return cut
            return None

    def expire_data_endpoints(self) -> int:
        """Make every data endpoint handed out so far expire; return the new generation."""
        with self._lock:
            self._generation += 1
            return self._generation

    @property
    def endpoint_generation(self) -> int:
        """The generation GetDataEndpoint currently puts in the endpoint URL."""
        return self._generation

    def endpoint_expired(self, generation: int | None) -> bool:
        """Whether a request made with this endpoint generation must be refused."""
        return generation is not None and generation < self._generation

    def clear(self) -> None:
        """Switch every fault off (endpoints handed out earlier become valid again)."""
        with self._lock:
            self._throttle_share = 0.0
            self._throttle_ops = frozenset(KINESIS_THROTTLED_OPERATIONS)
            self._partial_put_records = False
            self._cuts.clear()
            self._generation = 1
            self._dynamodb = _Throttle(DYNAMODB_THROTTLED_OPERATIONS)
            self._s3 = _Throttle(S3_THROTTLED_OPERATIONS)
        if self.kinesis_quotas is not None:
            self.kinesis_quotas.restore_default()
        if self.fanout is not None:
            self.fanout.restore_default()

    def snapshot(self) -> dict[str, Any]:
        """The current settings, JSON-ready."""
        extra: dict[str, Any] = {}
        if self.kinesis_quotas is not None:
            extra["kinesis_quotas"] = self.kinesis_quotas.snapshot()
        if self.fanout is not None:
            extra["kinesis_fanout"] = self.fanout.snapshot()
        with self._lock:
            return extra | {
                "kinesis_throttle": {
                    "share": self._throttle_share,
                    "operations": sorted(self._throttle_ops),
                    "partial_put_records": self._partial_put_records,
                },
                "dynamodb_throttle": self._dynamodb.snapshot(),
                "s3_throttle": self._s3.snapshot(),
                "cut_get_media": [asdict(cut) for cut in self._cuts],
                "endpoint_generation": self._generation,
            }

    def metrics_text(self) -> str:
        """The Kinesis quota counters in the Prometheus text format ("" without quotas)."""
        if self.kinesis_quotas is None:
            return ""
        return self.kinesis_quotas.metrics_text()

    def apply(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Apply a control-route JSON spec (see the module docstring); return `snapshot()`."""
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}")
        if spec.get("clear"):
            self.clear()
        if "kinesis_throttle" in spec:
            self.throttle_kinesis(**spec["kinesis_throttle"])
        if "dynamodb_throttle" in spec:
            self.throttle_dynamodb(**spec["dynamodb_throttle"])
        if "s3_throttle" in spec:
            self.throttle_s3(**spec["s3_throttle"])
        if "cut_get_media" in spec:
            self.cut_get_media(**spec["cut_get_media"])
        if spec.get("expire_data_endpoints"):
            self.expire_data_endpoints()
        if "kinesis_quotas" in spec:
            if self.kinesis_quotas is None:
                raise ValueError("this emulator has no Kinesis quotas")
            self.kinesis_quotas.configure(**spec["kinesis_quotas"])
        if "kinesis_fanout" in spec:
            if self.fanout is None:
                raise ValueError("this emulator has no enhanced fan-out")
            self.fanout.configure(**spec["kinesis_fanout"])
        return self.snapshot()


def remote_faults(control_url: str, spec: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Set faults of an emulator in another process; `control_url` as in its env()."""
    request = urllib.request.Request(
        control_url.rstrip("/") + "/faults",
        data=json.dumps(spec).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.load(response)
    return result


def remote_snapshot(control_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """`snapshot()` of an emulator in another process (faults, Kinesis quota counters)."""
    with urllib.request.urlopen(control_url.rstrip("/") + "/faults", timeout=timeout) as response:
        result: dict[str, Any] = json.load(response)
    return result
