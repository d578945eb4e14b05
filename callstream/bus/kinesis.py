"""Kinesis Data Streams producer: framed Avro records via PutRecords.

Failed entries of a batch (throttling, internal errors) are retried with
jittered exponential backoff until a deadline; nothing is dropped silently:
if the deadline passes, `StoreUnavailable` is raised and the caller does not
checkpoint, so the input is replayed. Errors no retry mends are raised at
once, classified by `callstream.awserrors`: `ConfigurationFault` (a missing
stream, access denied, the stream's KMS key denied or disabled, also as a
per-entry error code) or `PoisonRecordError` (a record Kinesis refuses).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import Outcome, classify, outcome_of_code
from callstream.contract import Contract, default_contract
from callstream.errors import ConfigurationFault, RetryableError, StoreUnavailable
from callstream.events import Event, partition_key

log = logging.getLogger(__name__)

MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024


def backoff_delays(base_s: float = 0.05, cap_s: float = 2.0) -> Any:
    """Full-jitter exponential backoff delays (seconds), forever."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap_s, base_s * (2**attempt)))
        attempt += 1


class KinesisPublisher:
    """Publishes events (or raw framed bytes) to one stream."""

    def __init__(
        self,
        client: Any,
        stream: str,
        contract: Contract | None = None,
        deadline_s: float = 120.0,
    ) -> None:
        self.client = client
        self.stream = stream
        self.contract = contract or default_contract()
        self.deadline_s = deadline_s
        self._log_extra = {"stream": stream}

    def publish(self, events: Sequence[Event]) -> None:
        """Encode and publish events; raises StoreUnavailable past the deadline."""
        self.put_raw([(partition_key(e), self.contract.encode(e)) for e in events])

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Publish (partition key, framed bytes) pairs in PutRecords batches."""
        for batch in _batches(items):
            self._put_batch(batch)

    def _put_batch(self, batch: list[tuple[str, bytes]]) -> None:
        pending = batch
        deadline = time.monotonic() + self.deadline_s
        delays = backoff_delays()
        while pending:
            pending = self._attempt(pending)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"{len(pending)} records not accepted by stream {self.stream} "
                    f"within {self.deadline_s:.0f} s"
                )
            time.sleep(next(delays))

    def _attempt(self, batch: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        entries = [{"PartitionKey": key, "Data": data} for key, data in batch]
        try:
            response = self.client.put_records(StreamName=self.stream, Records=entries)
        except (ClientError, BotoCoreError) as e:
            error = classify(e, what=f"put_records to {self.stream}")
            if not isinstance(error, RetryableError):
                raise error from e
            log.warning("put_records retried: %s", error, extra=self._log_extra)
            return batch
        if not response.get("FailedRecordCount"):
            return []
        results = list(zip(batch, response["Records"], strict=True))
        for _, result in results:
            self._check_entry(result)
        failed = [item for item, result in results if "ErrorCode" in result]
        log.info(
            "retrying %d of %d records", len(failed), len(batch), extra={"stream": self.stream}
        )
        return failed

    def _check_entry(self, result: dict[str, Any]) -> None:
        """Raise for a per-entry error code no retry mends (the stream's KMS key).

        PutRecords reports only throughput, internal and KMS errors per entry;
        an unknown code is retried, as those are."""
        code = result.get("ErrorCode")
        if code and outcome_of_code(code) is Outcome.STOP:
            raise ConfigurationFault(
                f"put_records to {self.stream} failed: {code}: {result.get('ErrorMessage', '')}"
            )


def _batches(items: Sequence[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    batches: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for key, data in items:
        item_size = len(key.encode()) + len(data)
        if current and (len(current) >= MAX_BATCH_RECORDS or size + item_size > MAX_BATCH_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append((key, data))
        size += item_size
    if current:
        batches.append(current)
    return batches
