"""Dead letters: list what the services could not process, and put it back (redrive).

Every service sends a record it cannot process to the dead-letter stream as a
`DeadLetter` (its original bytes, source stream, shard, sequence number,
partition key, the reason). This module reads that stream and puts chosen
originals back on their source stream once the cause is fixed:

    kinesis = aws.client("kinesis", region)
    for entry in list_dead_letters(kinesis, "callstream-deadletters", service="recorder"):
        print(entry.id, entry.letter.reason)
    report = redrive(
        kinesis,
        aws.client("dynamodb", region),
        deadletter_stream="callstream-deadletters",
        ledger_table="callstream-leases",
        reason="not an Avro",
    )

Redrive is idempotent per original record: a ledger item in the lease table
(`redriven/<source stream>/<shard>/<sequence>`) remembers each record put
back, so running it again puts nothing twice. Two services reading one
stream (transcriber and recorder on the audio stream) each dead-letter the
same record; it goes back once, and both see it again. The ledger item is
written after the put: if the process dies in between, the next redrive puts
the record again, which the services' idempotent outputs absorb.

AWS errors come out classified (`callstream.awserrors`): `ConfigurationFault`
for a missing stream or ledger table or denied access, `StoreUnavailable`
when throttling outlasts the SDK's retries; run the command again then.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import classify
from callstream.bus.kinesis import KinesisPublisher
from callstream.clock import now_ms
from callstream.contract import Contract, default_contract
from callstream.errors import PoisonRecordError
from callstream.events import DeadLetter

log = logging.getLogger(__name__)
LEDGER_PREFIX = "redriven/"


@dataclass(frozen=True)
class DeadLetterEntry:
    """One dead letter as stored in the dead-letter stream."""

    letter: DeadLetter
    shard_id: str  # of the dead-letter stream
    sequence_number: str  # in the dead-letter stream

    @property
    def id(self) -> str:
        """Where the letter is: `<dead-letter shard>/<sequence>`."""
        return f"{self.shard_id}/{self.sequence_number}"

    @property
    def original(self) -> str:
        """The original record: `<source stream>/<shard>/<sequence>` (the ledger's key)."""
        letter = self.letter
        return f"{letter.source_stream}/{letter.shard_id}/{letter.sequence_number}"


@dataclass
class RedriveReport:
    """What a redrive did: ids of dead letters put back, skipped as done, left alone."""

    redriven: list[str] = field(default_factory=list)
    already_redriven: list[str] = field(default_factory=list)
    unreadable: int = 0  # records in the dead-letter stream that are not DeadLetters


def list_dead_letters(
    kinesis: Any,
    stream: str,
    *,
    service: str | None = None,
    reason: str | None = None,
    contract: Contract | None = None,
) -> list[DeadLetterEntry]:
    """Every dead letter in `stream`, oldest first per shard.

    `service` keeps letters of that service only; `reason` keeps letters
    whose reason or error type contains it (case-insensitive).
    """
    return [
        entry
        for entry in _read_all(kinesis, stream, contract or default_contract(), None)
        if _matches(entry.letter, service, reason)
    ]


def redrive(
    kinesis: Any,
    dynamodb: Any,
    *,
    deadletter_stream: str,
    ledger_table: str,
    service: str | None = None,
    reason: str | None = None,
    dry_run: bool = False,
    contract: Contract | None = None,
) -> RedriveReport:
    """Put the original bytes of matching dead letters back on their source streams.

    Filters as `list_dead_letters`. Each original record goes back at most
    once across runs (see the module docstring); `dry_run` reports what would
    be put back without writing. `dynamodb` is a boto3 DynamoDB client and
    `ledger_table` the lease table (`CALLSTREAM_LEASE_TABLE`).
    """
    contract = contract or default_contract()
    report = RedriveReport()
    entries = [
        entry
        for entry in _read_all(kinesis, deadletter_stream, contract, report)
        if _matches(entry.letter, service, reason)
    ]
    publishers: dict[str, KinesisPublisher] = {}
    seen: set[str] = set()
    for entry in entries:
        if entry.original in seen or _redriven(dynamodb, ledger_table, entry):
            report.already_redriven.append(entry.id)
            continue
        seen.add(entry.original)
        if not dry_run:
            stream = entry.letter.source_stream
            publisher = publishers.setdefault(stream, KinesisPublisher(kinesis, stream, contract))
            publisher.put_raw([(entry.letter.partition_key, entry.letter.data)])
            _record(dynamodb, ledger_table, entry)
            log.info("redrove %s to %s", entry.original, stream)
        report.redriven.append(entry.id)
    return report


def _matches(letter: DeadLetter, service: str | None, reason: str | None) -> bool:
    if service is not None and letter.service != service:
        return False
    if reason is not None:
        needle = reason.lower()
        return needle in letter.reason.lower() or needle in letter.error_type.lower()
    return True


def _read_all(
    kinesis: Any, stream: str, contract: Contract, report: RedriveReport | None
) -> Iterator[DeadLetterEntry]:
    for shard in _shards(kinesis, stream):
        for record in _shard_records(kinesis, stream, shard):
            try:
                letter = contract.decode(record["Data"])
            except PoisonRecordError:
                letter = None
            if not isinstance(letter, DeadLetter):
                if report is not None:
                    report.unreadable += 1
                continue
            yield DeadLetterEntry(letter, shard, record["SequenceNumber"])


def _shards(kinesis: Any, stream: str) -> list[str]:
    shards: list[str] = []
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        try:
            page = kinesis.list_shards(**kwargs)
        except (ClientError, BotoCoreError) as e:
            raise classify(e, what=f"listing the shards of {stream}") from e
        shards.extend(shard["ShardId"] for shard in page["Shards"])
        if not page.get("NextToken"):
            return shards
        kwargs = {"NextToken": page["NextToken"]}


def _shard_records(kinesis: Any, stream: str, shard: str) -> Iterator[dict[str, Any]]:
    """Every record of one shard, from its oldest to the current end."""
    what = f"reading {stream}/{shard}"
    try:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
    except (ClientError, BotoCoreError) as e:
        raise classify(e, what=what) from e
    while iterator:
        try:
            response = kinesis.get_records(ShardIterator=iterator, Limit=1000)
        except (ClientError, BotoCoreError) as e:
            raise classify(e, what=what) from e
        yield from response["Records"]
        if not response["Records"] and response.get("MillisBehindLatest", 0) == 0:
            return
        iterator = response.get("NextShardIterator")


def _ledger_key(entry: DeadLetterEntry) -> dict[str, Any]:
    return {"lease_key": {"S": LEDGER_PREFIX + entry.original}}


def _redriven(dynamodb: Any, table: str, entry: DeadLetterEntry) -> bool:
    try:
        item = dynamodb.get_item(TableName=table, Key=_ledger_key(entry), ConsistentRead=True)
    except (ClientError, BotoCoreError) as e:
        raise classify(e, what=f"reading the redrive ledger in {table}") from e
    return "Item" in item


def _record(dynamodb: Any, table: str, entry: DeadLetterEntry) -> None:
    try:
        dynamodb.put_item(
            TableName=table,
            Item={
                **_ledger_key(entry),
                "dead_letter": {"S": entry.id},
                "redriven_at_ms": {"N": str(now_ms())},
            },
            ConditionExpression="attribute_not_exists(lease_key)",
        )
    except ClientError as e:
        if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
            raise classify(e, what=f"writing the redrive ledger in {table}") from e
    except BotoCoreError as e:
        raise classify(e, what=f"writing the redrive ledger in {table}") from e
