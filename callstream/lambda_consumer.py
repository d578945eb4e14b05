"""Run a runtime `Handler` as an AWS Lambda function under a Kinesis event source mapping.

The Fargate services run `callstream.runtime.ServiceLoop` with their own leases
and checkpoints. A stateless consumer can instead let Lambda's event source
mapping (ESM) do that: it reads the shards, batches, retries, bisects and
checkpoints. `KinesisBatchConsumer` is the function's handler. Per batch, with
aws-lambda-powertools' `BatchProcessor` and `process_partial_response`:

- each record's base64 data is decoded with `callstream.contract` and handed
  to a handler made for this batch alone (`make_handler`), so no per-call
  state outlives an invocation;
- an undecodable record, or one the handler rejects, goes to the dead-letter
  stream with its bytes and the reason and counts as processed: it never
  blocks the shard;
- a `RetryableError` (throttling, a store unavailable) makes that record a
  batch item failure. With `ReportBatchItemFailures` the ESM retries the batch
  from the lowest failed sequence number, so the records after it are not
  handled now but reported too (and handled, in order, on the retry);
- a buffered handler's `flush()` runs before the response; if it fails, the
  earliest record of a call with unflushed effects, and every record after
  it, are reported as failures;
- a `ConfigurationFault` (access denied, a missing table) fails the whole
  invocation loudly: nothing is passed and nothing is dead-lettered.

Which handlers qualify: those whose records are independent once their effects
are written (persister, sentiment, a team's own writer). The ingest,
transcriber and recorder keep per-call state across many records (an open
GetMedia, a speech stream, a spool) and stay long-running services.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import (
    KinesisStreamRecord,
)

from callstream.bus.ports import RawSink, Record
from callstream.contract import Contract, default_contract
from callstream.errors import ConfigurationFault, PoisonRecordError, RetryableError
from callstream.runtime import (
    Handler,
    acknowledge_rejection,
    dead_letter,
    flush_rejecting,
    handle_rejecting,
)

log = logging.getLogger(__name__)


class KinesisBatchConsumer:
    """A Lambda handler: one Kinesis ESM batch in, a partial batch response out."""

    def __init__(
        self,
        service: str,
        make_handler: Callable[[], Handler],
        deadletters: RawSink,
        contract: Contract | None = None,
    ) -> None:
        self.service = service
        self.make_handler = make_handler
        self.deadletters = deadletters
        self.contract = contract or default_contract()

    def __call__(self, event: dict[str, Any], context: Any = None) -> PartialItemFailureResponse:
        """Handle the batch; return `{"batchItemFailures": [...]}`."""
        batch = _Batch(self, self.make_handler())
        processor = _OrderedProcessor(batch)
        return process_partial_response(
            event=event, record_handler=batch.handle, processor=processor, context=context
        )

    def dead_letter(self, record: Record, reason: str, error_type: str) -> None:
        """Send a record's bytes and the reason to the dead-letter stream."""
        dead_letter(self.deadletters, self.contract, self.service, record, reason, error_type)


def to_record(record: KinesisStreamRecord) -> Record:
    """The runtime's `Record` for one ESM record (stream from the ARN, shard from the id)."""
    stream = (record.event_source_arn or "").rsplit("/", 1)[-1]
    shard = (record.event_id or "").split(":", 1)[0]
    kinesis = record.kinesis
    return Record(
        stream=stream,
        shard_id=shard,
        sequence_number=kinesis.sequence_number,
        partition_key=kinesis.partition_key,
        data=base64.b64decode(kinesis.data),
    )


class _Batch:
    """One invocation: its handler, and the call each handled record belongs to."""

    def __init__(self, consumer: KinesisBatchConsumer, handler: Handler) -> None:
        self.consumer = consumer
        self.handler = handler
        self.contacts: dict[str, str] = {}  # sequence number -> contact of a handled record

    def handle(self, record: KinesisStreamRecord) -> None:
        """Decode and handle one record; dead-letter it if it can never succeed."""
        item = to_record(record)
        try:
            event = self.consumer.contract.decode(item.data)
            self._apply(event, item)
        except (RetryableError, ConfigurationFault):
            raise  # checked first: an unknown writer schema is retryable, not poison
        except PoisonRecordError as e:
            self._reject(item, e)
            return
        except Exception as e:  # a record that breaks the handler must not stop the shard
            log.exception("record rejected", extra={"shard_id": item.shard_id})
            self.consumer.dead_letter(item, f"{type(e).__name__}: {e}", type(e).__name__)
            return
        contact = getattr(event, "contact_id", None)
        if contact is not None:
            self.contacts[item.sequence_number] = contact

    def _apply(self, event: Any, record: Record) -> None:
        handle_rejecting(self.handler, event, record, self._reject)

    def flush(self) -> None:
        """Make buffered effects durable; dead-letter a record the flush names as poison."""
        self.handler.tick()
        flush_rejecting(self.handler, self._reject)

    def _reject(self, record: Record, error: PoisonRecordError) -> None:
        self.consumer.dead_letter(record, error.reason, type(error).__name__)
        acknowledge_rejection(self.handler, error)

    def unsettled_from(self, sequence_numbers: list[str]) -> str | None:
        """The first of these handled records whose call still has unflushed effects."""
        for sequence in sequence_numbers:
            contact = self.contacts.get(sequence)
            if contact is not None and not self.handler.is_settled(contact):
                return sequence
        return None


class _OrderedProcessor(BatchProcessor):
    """powertools' Kinesis processor that keeps shard order and flushes before answering.

    After the first failed record the rest are reported without being handled:
    the ESM retries from the lowest failed sequence number anyway, and handling
    them now would apply a call's later records before its earlier ones."""

    def __init__(self, batch: _Batch) -> None:
        super().__init__(EventType.KinesisDataStreams, raise_on_entire_batch_failure=False)
        self.batch = batch
        self.handled: list[dict[str, Any]] = []  # raw records handled successfully, in order

    def _process_record(self, record: dict[str, Any]) -> Any:
        if self.fail_messages:
            skipped = RetryableError("not handled: an earlier record of this batch failed")
            return self._fail(record, skipped)
        result = super()._process_record(record)
        if result[0] == "success":
            self.handled.append(record)
        return result

    def process(self) -> list[tuple[Any, ...]]:
        results = super().process()
        fault = next((e[1] for e in self.exceptions if isinstance(e[1], ConfigurationFault)), None)
        if fault is not None:
            log.critical("configuration fault, failing the batch: %s", fault)
            raise fault
        try:
            self.batch.flush()
        except RetryableError as e:
            log.warning("flush failed, its records will be retried: %s", e)
            self._fail_unflushed(e)
        return results

    def _fail(self, record: dict[str, Any], error: Exception) -> Any:
        return self.failure_handler(
            self._to_batch_type(record, self.event_type), (type(error), error, None)
        )

    def _fail_unflushed(self, error: RetryableError) -> None:
        """Report the first record with unflushed effects, and every later success, as failed."""
        sequences = [r["kinesis"]["sequenceNumber"] for r in self.handled]
        # a handler that cannot say which calls are unflushed: retry all it handled
        first = self.batch.unsettled_from(sequences) or (sequences[0] if sequences else None)
        if first is None:
            return
        moved = self.handled[sequences.index(first) :]
        self.success_messages[:] = [
            m for m in self.success_messages if all(m is not r for r in moved)
        ]
        for raw in moved:
            self._fail(raw, error)
