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
- dynamodb PutItem/BatchWriteItem/UpdateItem/GetItem/Query/Scan and S3
  PutObject/HeadObject/GetObject go through the throttling fault hooks
  (`Faults.throttle_dynamodb`, `Faults.throttle_s3`), off by default;
  BatchWriteItem may instead leave a share of its items in UnprocessedItems.
- atomicity moto lacks under its threaded server: Kinesis appends to a shard
  under a lock (moto computes "last sequence + 1" unlocked, so two
  concurrent PutRecords to one shard could get the same number and one
  record silently replaced the other; reads that iterate a shard while it
  grows failed with "OrderedDict mutated during iteration"), and DynamoDB
  writes run one at a time
  (moto checks a ConditionExpression and writes in two unlocked steps, so
  two conditional lease takes could both succeed).
- kinesis per-shard quotas (`kinesis_quotas`, on unless the Emulator says
  otherwise): PutRecord fails whole and PutRecords entry by entry with
  ProvisionedThroughputExceededException over 1 MiB/s or 1,000 records/s;
  GetRecords is refused over 5 calls/s or 2 MiB/s per shard (shared by every
  caller), returns at most 10,000 records and 10 MiB, and refuses a Limit
  above 10,000 with InvalidArgumentException.
- kinesis enhanced fan-out (`kinesis_fanout`): consumers go CREATING ->
  ACTIVE and DELETING, ARNs carry the creation time, names are unique per
  stream; SubscribeToShard itself is served by the fan-out hub in front of
  moto (see the Emulator), woken by every shard append.
- kinesis resharding behaves as on AWS (moto 5.2.5 got it wrong): after
  SplitShard/MergeShards/UpdateShardCount a closed parent keeps its records
  and takes no more writes, hash keys route to the open shard whose
  (inclusive) range holds them, and GetRecords at the end of a closed shard
  returns `ChildShards` and no `NextShardIterator`.

Not modelled: the other control-plane rate limits (DescribeStream 10/s per
account, ListShards, GetShardIterator 5/s per shard, ...).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.dynamodb.responses import DynamoHandler
from moto.kinesis.exceptions import InvalidArgumentError
from moto.kinesis.models import KinesisBackend, Record, Shard, Stream
from moto.kinesis.responses import KinesisResponse
from moto.kinesis.utils import compose_shard_iterator, decompose_shard_iterator
from moto.kinesisvideo.models import KinesisVideoBackend
from moto.s3.responses import S3Response

from callstream_emulator.faults import Faults
from callstream_emulator.kinesis_quotas import MAX_BYTES_PER_GET, MAX_RECORDS_PER_GET, KinesisQuotas

if TYPE_CHECKING:
    from callstream_emulator.kinesis_fanout import FanoutHub

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


def apply(
    data_endpoint: Callable[[], str],
    faults: Faults,
    *,
    quotas: KinesisQuotas | None = None,
    fanout: FanoutHub | None = None,
) -> PatchSet:
    """Install every patch; `data_endpoint()` gives the URL GetDataEndpoint returns.

    `quotas` enforces Kinesis's per-shard limits (None: no quota patch);
    `fanout` gets the consumer registry patches and a wake-up per shard append.
    """
    global _active
    with _active_lock:
        if _active is not None:
            raise RuntimeError(
                "another Emulator is running in this process; moto backends are process-global"
            )
        patches = _active = PatchSet()
    try:
        _patch_kinesisvideo_data_endpoint(patches, data_endpoint)
        _patch_atomic_writes(patches)  # innermost: throttling wraps the locked handlers
        _patch_kinesis_resharding(patches)  # before throttling, which wraps its GetRecords
        _patch_kinesis_throttling(patches, faults)
        if quotas is not None:
            _patch_kinesis_quotas(patches, quotas)
        _patch_dynamodb_throttling(patches, faults)
        _patch_s3_throttling(patches, faults)
        if fanout is not None:
            fanout.patch(patches, _WRITE_LOCK)
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


_WRITE_LOCK = threading.RLock()


def _locked(original: Callable[..., Any]) -> Any:
    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _WRITE_LOCK:
            return original(*args, **kwargs)

    return wrapper


def _patch_atomic_writes(patches: PatchSet) -> None:
    """Serialise shard appends and DynamoDB writes, as the real services are atomic."""
    for method in ("put_record", "get_records", "to_json"):  # reads iterate the records dict
        patches.replace(Shard, method, _locked(getattr(Shard, method)))
    for method in (
        "put_item",
        "update_item",
        "delete_item",
        "batch_write_item",
        "transact_write_items",
    ):
        patches.replace(DynamoHandler, method, _locked(getattr(DynamoHandler, method)))


def _patch_dynamodb_throttling(patches: PatchSet, faults: Faults) -> None:
    for method, operation in (
        ("put_item", "PutItem"),
        ("update_item", "UpdateItem"),
        ("get_item", "GetItem"),
        ("query", "Query"),
        ("scan", "Scan"),
    ):
        original = getattr(DynamoHandler, method)
        patches.replace(DynamoHandler, method, _dynamodb_throttled(original, operation, faults))
    patches.replace(
        DynamoHandler,
        "batch_write_item",
        _batch_write_throttled(DynamoHandler.batch_write_item, faults),
    )


def _dynamodb_error(operation: str) -> JsonRESTError:
    return JsonRESTError(
        "ProvisionedThroughputExceededException",
        f"Throughput exceeded for {operation} (emulator fault injection).",
    )


def _dynamodb_throttled(original: Callable[[Any], Any], operation: str, faults: Faults) -> Any:
    @functools.wraps(original)
    def wrapper(self: DynamoHandler) -> Any:
        if faults.dynamodb_throttled(operation):
            raise _dynamodb_error(operation)
        return original(self)

    return wrapper


def _batch_write_throttled(original: Callable[[Any], Any], faults: Faults) -> Any:
    """Whole-request throttling, or (partial) a share of the items left unprocessed."""

    @functools.wraps(original)
    def wrapper(self: DynamoHandler) -> Any:
        if not faults.partial_batch_writes:
            if faults.dynamodb_throttled("BatchWriteItem"):
                raise _dynamodb_error("BatchWriteItem")
            return original(self)
        kept: dict[str, list[Any]] = {}
        unprocessed: dict[str, list[Any]] = {}
        for table, requests in self.body["RequestItems"].items():
            for request in requests:
                hit = faults.dynamodb_throttled("BatchWriteItem")
                (unprocessed if hit else kept).setdefault(table, []).append(request)
        self.body["RequestItems"] = kept
        result = original(self) if kept else ActionResult({"UnprocessedItems": {}})
        answer: dict[str, Any] = dict(cast(dict[str, Any], result.result))
        answer["UnprocessedItems"] = unprocessed
        return ActionResult(answer)

    return wrapper


def _patch_s3_throttling(patches: PatchSet, faults: Faults) -> None:
    original = S3Response._key_response

    @functools.wraps(original)
    def key_response(self: S3Response, request: Any, full_url: str) -> Any:
        method = getattr(request, "method", "")
        operation = {"PUT": "PutObject", "HEAD": "HeadObject", "GET": "GetObject"}.get(method)
        if operation is not None and faults.s3_throttled(operation):
            body = (
                "<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                "<Message>Please reduce your request rate (emulator fault injection).</Message>"
                "</Error>"
            )
            return 503, {"Content-Type": "application/xml"}, body
        return original(self, request, full_url)

    patches.replace(S3Response, "_key_response", key_response)


def _patch_kinesis_resharding(patches: PatchSet) -> None:
    """Closed parents keep their records and take no writes; their ends name the children."""
    patches.replace(Stream, "get_shard_for_key", _open_shard_for_key)
    patches.replace(Stream, "split_shard", _split_shard)
    patches.replace(Stream, "merge_shards", _merge_shards)
    patches.replace(KinesisResponse, "get_records", _get_records_with_children)


def _open_shard_for_key(self: Stream, partition_key: str, explicit_hash_key: str) -> Shard | None:
    """The open shard whose inclusive hash range holds the key (AWS routing)."""
    if not isinstance(partition_key, str) or len(partition_key) > 256:
        raise InvalidArgumentError("partition_key")
    if explicit_hash_key:
        key = int(explicit_hash_key)
        if key >= 2**128:
            raise InvalidArgumentError("explicit_hash_key")
    else:
        key = int(hashlib.md5(partition_key.encode("utf-8")).hexdigest(), 16)
    for shard in self.shards.values():
        if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
            return shard
    return None


def _next_shard_index(stream: Stream) -> int:
    return max(shard._shard_id for shard in stream.shards.values()) + 1


def _split_shard(self: Stream, shard_to_split: str, new_starting_hash_key: str) -> None:
    """Close the parent where it stands (records stay) and open two empty children."""
    shard = self.get_shard(shard_to_split)
    start = int(new_starting_hash_key)
    if not shard.starting_hash < start <= shard.ending_hash:
        raise InvalidArgumentError(
            f"NewStartingHashKey {start} is not within shard {shard_to_split}'s hash range"
        )
    if not shard.is_open:
        raise InvalidArgumentError(f"Shard {shard_to_split} has already been merged or split")
    index = _next_shard_index(self)
    for offset, (low, high) in enumerate(
        ((shard.starting_hash, start - 1), (start, shard.ending_hash))
    ):
        child = Shard(index + offset, low, high, parent=shard.shard_id)
        self.shards[child.shard_id] = child
    shard.is_open = False


def _merge_shards(self: Stream, shard_to_merge: str, adjacent_shard_to_merge: str) -> None:
    """Close two adjacent parents (records stay) and open one empty child over both."""
    first = self.get_shard(shard_to_merge)
    second = self.get_shard(adjacent_shard_to_merge)
    low, high = sorted((first, second), key=lambda s: s.starting_hash)
    if low.ending_hash + 1 != high.starting_hash:
        raise InvalidArgumentError(adjacent_shard_to_merge)
    if not (first.is_open and second.is_open):
        raise InvalidArgumentError("only open shards can be merged")
    child = Shard(
        _next_shard_index(self),
        low.starting_hash,
        high.ending_hash,
        parent=first.shard_id,
        adjacent_parent=second.shard_id,
    )
    self.shards[child.shard_id] = child
    first.is_open = False
    second.is_open = False


def _get_records_with_children(self: KinesisResponse) -> ActionResult:
    """GetRecords; at the end of a closed shard, ChildShards and no NextShardIterator."""
    stream_name, shard_id, _ = decompose_shard_iterator(self._get_param("ShardIterator"))
    stream = self.kinesis_backend.describe_stream(
        stream_arn=self._get_param("StreamARN"), stream_name=stream_name
    )
    shard = stream.get_shard(shard_id)
    next_iterator, records, behind = self.kinesis_backend.get_records(
        self._get_param("StreamARN"), self._get_param("ShardIterator"), self._get_param("Limit")
    )
    result: dict[str, Any] = {
        "Records": [record.to_json() for record in records],
        "MillisBehindLatest": behind,
    }
    last = int(decompose_shard_iterator(next_iterator)[2])
    if shard.is_open or last < shard.get_max_sequence_number():
        result["NextShardIterator"] = next_iterator
    else:
        result["ChildShards"] = child_shards(stream, shard_id)
        result["MillisBehindLatest"] = 0
    return ActionResult(result)


def child_shards(stream: Stream, shard_id: str) -> list[dict[str, Any]]:
    """The ChildShards entries of a closed shard, as GetRecords and SubscribeToShard give them."""
    return [
        {
            "ShardId": child.shard_id,
            "ParentShards": [p for p in (child.parent, child.adjacent_parent) if p],
            "HashKeyRange": {
                "StartingHashKey": str(child.starting_hash),
                "EndingHashKey": str(child.ending_hash),
            },
        }
        for child in stream.shards.values()
        if shard_id in (child.parent, child.adjacent_parent)
    ]


def record_size(record: Record) -> int:
    """What a record counts against the quotas: data blob plus partition key."""
    return len(base64.b64decode(record.data)) + len(record.partition_key.encode("utf-8"))


def _entry_size(entry: dict[str, Any]) -> int:
    data = entry.get("Data") or ""
    return len(base64.b64decode(data)) + len(str(entry.get("PartitionKey") or "").encode("utf-8"))


def _rate_exceeded(shard_id: str, stream: Stream) -> str:
    return (
        f"Rate exceeded for shard {shard_id} in stream {stream.stream_name} "
        f"under account {stream.account_id}."
    )


def _patch_kinesis_quotas(patches: PatchSet, quotas: KinesisQuotas) -> None:
    """Per-shard write and read budgets on the backend, under every response path."""
    patches.replace(
        KinesisBackend, "put_record", _quota_put_record(KinesisBackend.put_record, quotas)
    )
    patches.replace(
        KinesisBackend, "put_records", _quota_put_records(KinesisBackend.put_records, quotas)
    )
    patches.replace(
        KinesisBackend, "get_records", _quota_get_records(KinesisBackend.get_records, quotas)
    )


def _quota_put_record(original: Callable[..., Any], quotas: KinesisQuotas) -> Any:
    @functools.wraps(original)
    def put_record(
        self: KinesisBackend,
        stream_arn: str,
        stream_name: str,
        partition_key: str,
        explicit_hash_key: str,
        data: str,
    ) -> Any:
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        shard = stream.get_shard_for_key(partition_key, explicit_hash_key)
        entry = {"Data": data, "PartitionKey": partition_key}
        if shard is not None and not quotas.admit_write(
            stream.arn, shard.shard_id, _entry_size(entry), "PutRecord"
        ):
            raise JsonRESTError(
                "ProvisionedThroughputExceededException", _rate_exceeded(shard.shard_id, stream)
            )
        return original(self, stream_arn, stream_name, partition_key, explicit_hash_key, data)

    return put_record


# moto's own PutRecords request limits; a request over them goes to moto unchanged to fail there.
_MAX_PUT_RECORDS = 500
_MAX_PUT_RECORDS_BYTES = 5 * 1024 * 1024
_MAX_RECORD_BYTES = 1024 * 1024


def _quota_put_records(original: Callable[..., Any], quotas: KinesisQuotas) -> Any:
    @functools.wraps(original)
    def put_records(
        self: KinesisBackend, stream_arn: str, stream_name: str, records: list[dict[str, Any]]
    ) -> dict[str, Any]:
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        sizes = [_entry_size(entry) for entry in records]
        if (
            len(records) > _MAX_PUT_RECORDS
            or sum(sizes) > _MAX_PUT_RECORDS_BYTES
            or any(size > _MAX_RECORD_BYTES for size in sizes)
        ):
            return cast(dict[str, Any], original(self, stream_arn, stream_name, records))
        refused: list[str | None] = []
        for entry, size in zip(records, sizes, strict=True):
            key, hash_key = entry.get("PartitionKey", ""), entry.get("ExplicitHashKey", "")
            shard = stream.get_shard_for_key(key, hash_key)
            ok = shard is None or quotas.admit_write(stream.arn, shard.shard_id, size, "PutRecords")
            refused.append(None if ok or shard is None else shard.shard_id)
        accepted = [e for e, shard_id in zip(records, refused, strict=True) if shard_id is None]
        result: dict[str, Any] = {"FailedRecordCount": 0, "Records": []}
        if accepted:
            result = original(self, stream_arn, stream_name, accepted)
        stored = iter(result["Records"])
        merged = [
            next(stored)
            if shard_id is None
            else {
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": _rate_exceeded(shard_id, stream),
            }
            for shard_id in refused
        ]
        failed = result.get("FailedRecordCount", 0) + sum(s is not None for s in refused)
        return {"FailedRecordCount": failed, "Records": merged}

    return put_records


def _quota_get_records(original: Callable[..., Any], quotas: KinesisQuotas) -> Any:
    @functools.wraps(original)
    def get_records(
        self: KinesisBackend, stream_arn: str | None, shard_iterator: str, limit: int | None
    ) -> tuple[str, list[Record], int]:
        if limit is not None and int(limit) > MAX_RECORDS_PER_GET:
            raise InvalidArgumentError(
                f"Limit {limit} is above the maximum of {MAX_RECORDS_PER_GET} records per call"
            )
        stream_name, shard_id, _ = decompose_shard_iterator(shard_iterator)
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        shard = stream.get_shard(shard_id)
        if not quotas.admit_read(stream.arn, shard_id):
            raise JsonRESTError(
                "ProvisionedThroughputExceededException",
                f"Rate exceeded for Shard - {stream.account_id}/{stream.stream_name}/{shard_id}",
            )
        capped = MAX_RECORDS_PER_GET if limit is None else int(limit)
        next_iterator, records, behind = original(self, stream_arn, shard_iterator, capped)
        kept, size = _within_bytes(records, MAX_BYTES_PER_GET)
        if len(kept) < len(records):
            next_iterator = compose_shard_iterator(stream_name, shard, kept[-1].sequence_number)
            behind += int((records[-1].created_at - kept[-1].created_at) * 1000)
        quotas.charge_read(stream.arn, shard_id, size)
        return next_iterator, kept, behind

    return get_records


def _within_bytes(records: list[Record], limit: int) -> tuple[list[Record], int]:
    """The leading records whose sizes add up to at most `limit` (always the first)."""
    total = 0
    for index, record in enumerate(records):
        size = record_size(record)
        if index and total + size > limit:
            return records[:index], total
        total += size
    return records, total
