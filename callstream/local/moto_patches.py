"""Patches to moto's in-process backends, applied while an Emulator runs.

moto backends are process-global, so one Emulator per process may hold the
patches at a time; `apply()` refuses a second one and `PatchSet.revert()`
restores moto exactly.

Patched here:
- kinesisvideo GetDataEndpoint returns our media endpoint URL (with the
  current endpoint generation) for every APIName, instead of an unreachable
  `https://s-xxxx.kinesisvideo.<region>.amazonaws.com`.
- kinesis PutRecord / PutRecords / GetRecords go through the throttling
  fault hook (`Faults.throttle_kinesis`), off by default.

Known gaps of moto 5.2.5 Kinesis, to be patched here next (see
`_patch_kinesis_resharding` and `_patch_kinesis_subscribe_to_shard`):
- resharding is wrong: after SplitShard/MergeShards/UpdateShardCount, writes
  still go to the closed parent shard, and GetRecords on a closed shard never
  returns `ChildShards` (nor a null NextShardIterator at its end);
- SubscribeToShard (enhanced fan-out) is not implemented;
- it never throttles by itself (no per-shard 1 MB/s, 1000 rec/s, 5 reads/s).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.kinesis.responses import KinesisResponse
from moto.kinesisvideo.models import KinesisVideoBackend

from callstream.local.faults import Faults

logger = logging.getLogger(__name__)

_MISSING = object()
_active_lock = threading.Lock()
_active: PatchSet | None = None


class PatchSet:
    """Attribute replacements on moto classes, revertible in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Any) -> None:
        """Set `owner.name = value`, remembering what was there."""
        self._undo.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    def revert(self) -> None:
        """Undo every replacement and release the process-wide slot."""
        global _active
        while self._undo:
            owner, name, original = self._undo.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        with _active_lock:
            if _active is self:
                _active = None


def apply(data_endpoint: Callable[[], str], faults: Faults) -> PatchSet:
    """Install every patch; `data_endpoint()` gives the URL GetDataEndpoint returns."""
    global _active
    with _active_lock:
        if _active is not None:
            raise RuntimeError(
                "another Emulator is running in this process; moto backends are process-global"
            )
        patches = _active = PatchSet()
    try:
        _patch_kinesisvideo_data_endpoint(patches, data_endpoint)
        _patch_kinesis_throttling(patches, faults)
        _patch_kinesis_resharding(patches)
        _patch_kinesis_subscribe_to_shard(patches)
    except BaseException:
        patches.revert()
        raise
    return patches


def _patch_kinesisvideo_data_endpoint(patches: PatchSet, data_endpoint: Callable[[], str]) -> None:
    def get_data_endpoint(
        self: KinesisVideoBackend, stream_name: str, stream_arn: str, api_name: str
    ) -> str:
        self._get_stream(stream_name, stream_arn)  # ResourceNotFoundException as before
        return data_endpoint()

    patches.replace(KinesisVideoBackend, "get_data_endpoint", get_data_endpoint)


def throughput_exceeded(operation: str) -> JsonRESTError:
    """The error real Kinesis answers a throttled request with (HTTP 400)."""
    return JsonRESTError(
        "ProvisionedThroughputExceededException",
        f"Rate exceeded for {operation} (emulator fault injection).",
    )


def _patch_kinesis_throttling(patches: PatchSet, faults: Faults) -> None:
    for method, operation in (
        ("put_record", "PutRecord"),
        ("put_records", "PutRecords"),
        ("get_records", "GetRecords"),
    ):
        original = getattr(KinesisResponse, method)
        patches.replace(KinesisResponse, method, _throttled(original, operation, faults))


def _throttled(original: Callable[[Any], Any], operation: str, faults: Faults) -> Any:
    @functools.wraps(original)
    def wrapper(self: KinesisResponse) -> Any:
        if operation == "PutRecords" and faults.partial_put_records:
            return _put_records_partially(self, faults)
        if faults.kinesis_throttled(operation):
            raise throughput_exceeded(operation)
        return original(self)

    return wrapper


def _put_records_partially(response: KinesisResponse, faults: Faults) -> ActionResult:
    """PutRecords where each entry is throttled on its own, like real Kinesis."""
    records = response._get_param("Records") or []
    throttled = [faults.kinesis_throttled("PutRecords") for _ in records]
    accepted = [record for record, hit in zip(records, throttled, strict=True) if not hit]
    result: dict[str, Any] = {"FailedRecordCount": 0, "Records": []}
    if accepted:
        result = response.kinesis_backend.put_records(
            response._get_param("StreamARN"), response._get_param("StreamName"), accepted
        )
    stored = iter(result["Records"])
    failure = {
        "ErrorCode": "ProvisionedThroughputExceededException",
        "ErrorMessage": "Rate exceeded for shard (emulator fault injection).",
    }
    merged = [dict(failure) if hit else next(stored) for hit in throttled]
    failed = result.get("FailedRecordCount", 0) + sum(throttled)
    return ActionResult({"FailedRecordCount": failed, "Records": merged})


def _patch_kinesis_resharding(patches: PatchSet) -> None:
    """Placeholder: route writes to open child shards, return ChildShards (later task)."""


def _patch_kinesis_subscribe_to_shard(patches: PatchSet) -> None:
    """Placeholder: SubscribeToShard over an event stream (later task)."""
