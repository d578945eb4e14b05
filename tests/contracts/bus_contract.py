"""The bus ports' contract (`callstream/bus/ports.py`), written once for every adapter.

`EventSink.publish` / `RawSink.put_raw` and `RecordSource.poll` / `checkpoint` /
`rewind` / `close`, as a service relies on them. Each `check_*` function takes a
`BusAdapter` (one fresh stream, a way to make its sink and sources) and raises
AssertionError when the adapter breaks the port; `test_contract_bus.py` runs
every check over every adapter (memory, Kinesis polling, Kinesis fan-out).

Timing is the adapter's business: a source may return a record a few polls
after it was published (Kinesis polling reads at most every 0.2 s), so the
checks poll until they have what they expect or the adapter's `patience_s`
runs out. "Nothing new" is checked over `quiet_s` of polls.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from callstream.bus.ports import Record, RecordSource
from callstream.contract import default_contract
from callstream.events import CallStarted, Event

# Keys chosen to land on both shards of a 2-shard stream (MD5 of the key, like Kinesis).
KEYS = ("call-a", "call-b", "call-c", "call-d")


class Sink(Protocol):
    """What a publisher adapter offers: both sink ports of one stream."""

    stream: str

    def publish(self, events: Sequence[Event]) -> None: ...

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None: ...


class BusAdapter(Protocol):
    """One fresh stream of `shard_count` shards behind one adapter family.

    `source()` makes a new consumer instance of one consumer group, as a new
    process would: it shares the group's checkpoints with every earlier source
    of this adapter, and may take shards only once earlier sources closed.
    """

    name: str
    patience_s: float  # how long a published record may take to be polled
    quiet_s: float  # how long to poll to be sure nothing more comes
    at_once_s: float  # a closed source's shards are read by a new one within this (< a lease)

    def sink(self) -> Sink: ...

    def source(self) -> RecordSource: ...

    def shard_ids(self) -> set[str]: ...


def events_for(key: str, start: int, count: int) -> list[Event]:
    """`count` events of one call, numbered from `start` (the number is their order)."""
    return [
        CallStarted(contact_id=key, stream_arn=f"arn:{key}", requested_at_ms=start + i)
        for i in range(count)
    ]


def number(record: Record) -> tuple[str, int]:
    """(partition key's call, order number) of a record published by `events_for`."""
    event = default_contract().decode(record.data)
    assert isinstance(event, CallStarted), event
    return event.contact_id, event.requested_at_ms


def poll_for(adapter: BusAdapter, source: RecordSource, count: int) -> list[Record]:
    """Poll until `count` records came (or patience ran out); exactly what came."""
    got: list[Record] = []
    deadline = time.monotonic() + adapter.patience_s
    while len(got) < count and time.monotonic() < deadline:
        got += source.poll()
    assert len(got) >= count, f"{adapter.name}: expected {count} records, polled {len(got)}"
    return got


def assert_quiet(adapter: BusAdapter, source: RecordSource) -> None:
    """Every poll for `quiet_s` returns []."""
    deadline = time.monotonic() + adapter.quiet_s
    while time.monotonic() < deadline:
        extra = source.poll()
        assert extra == [], f"{adapter.name}: nothing new was published, polled {extra}"


def publish_all(sink: Sink, per_key: int) -> dict[str, list[int]]:
    """Publish `per_key` events for each of KEYS, interleaved, in two publish calls."""
    sent: dict[str, list[int]] = {key: list(range(per_key)) for key in KEYS}
    half = per_key // 2
    for start, count in ((0, half), (half, per_key - half)):
        batch = [e for key in KEYS for e in events_for(key, start, count)]
        sink.publish(batch)
    return sent


def by_key(records: list[Record]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for record in records:
        key, n = number(record)
        out.setdefault(key, []).append(n)
    return out


# --- the checks ---------------------------------------------------------------------


def check_publish_then_poll_returns_every_event_once_in_order_per_key(
    adapter: BusAdapter,
) -> None:
    sink, source = adapter.sink(), adapter.source()
    sent = publish_all(sink, per_key=6)
    got = poll_for(adapter, source, 6 * len(KEYS))
    assert by_key(got) == sent, f"{adapter.name}: per-key order or content differs"
    assert_quiet(adapter, source)
    source.close()


def check_records_carry_stream_shard_sequence_and_partition_key(adapter: BusAdapter) -> None:
    sink, source = adapter.sink(), adapter.source()
    publish_all(sink, per_key=3)
    got = poll_for(adapter, source, 3 * len(KEYS))
    shards = adapter.shard_ids()
    last: dict[str, int] = {}
    for record in got:
        assert record.stream == sink.stream == source.stream
        assert record.shard_id in shards, (record.shard_id, shards)
        assert record.partition_key == number(record)[0]
        sequence = int(record.sequence_number)
        assert sequence > last.get(record.shard_id, -1), "sequence numbers rise per shard"
        last[record.shard_id] = sequence
    by_shard = {r.partition_key: r.shard_id for r in got}
    assert all(by_shard[r.partition_key] == r.shard_id for r in got), "a key stays on its shard"
    source.close()


def check_raw_records_arrive_byte_for_byte(adapter: BusAdapter) -> None:
    sink, source = adapter.sink(), adapter.source()
    items = [("call-a", f"raw-{i}".encode()) for i in range(5)]
    sink.put_raw(items)
    got = poll_for(adapter, source, 5)
    assert [(r.partition_key, r.data) for r in got] == items
    source.close()


def check_a_poll_with_nothing_new_returns_nothing(adapter: BusAdapter) -> None:
    source = adapter.source()
    assert_quiet(adapter, source)
    adapter.sink().publish(events_for("call-a", 0, 2))
    poll_for(adapter, source, 2)
    assert_quiet(adapter, source)
    source.close()


def check_exclusive_checkpoint_resumes_after_the_record(adapter: BusAdapter) -> None:
    sink, first = adapter.sink(), adapter.source()
    sink.publish(events_for("call-a", 0, 6))
    got = poll_for(adapter, first, 6)
    first.checkpoint(got[2].shard_id, got[2].sequence_number, inclusive=False)
    first.close()
    second = adapter.source()
    again = poll_for(adapter, second, 3)
    assert [number(r)[1] for r in again] == [3, 4, 5]
    assert_quiet(adapter, second)
    second.close()


def check_inclusive_checkpoint_resumes_at_the_record(adapter: BusAdapter) -> None:
    sink, first = adapter.sink(), adapter.source()
    sink.publish(events_for("call-a", 0, 6))
    got = poll_for(adapter, first, 6)
    first.checkpoint(got[2].shard_id, got[2].sequence_number, inclusive=True)
    first.close()
    second = adapter.source()
    again = poll_for(adapter, second, 4)
    assert [number(r)[1] for r in again] == [2, 3, 4, 5]
    assert [r.sequence_number for r in again] == [r.sequence_number for r in got[2:]]
    second.close()


def check_close_lets_a_new_source_read_from_the_checkpoint_at_once(adapter: BusAdapter) -> None:
    sink, first = adapter.sink(), adapter.source()
    sink.publish(events_for("call-a", 0, 4))
    got = poll_for(adapter, first, 4)
    first.checkpoint(got[-1].shard_id, got[-1].sequence_number, inclusive=False)
    first.close()
    sink.publish(events_for("call-a", 4, 2))
    second = adapter.source()
    started = time.monotonic()
    again = poll_for(adapter, second, 2)
    took = time.monotonic() - started
    assert took < adapter.at_once_s, f"{adapter.name}: shards taken after {took:.1f} s"
    assert [number(r)[1] for r in again] == [4, 5]
    second.close()


def check_rewind_reads_again_from_the_record(adapter: BusAdapter) -> None:
    sink, source = adapter.sink(), adapter.source()
    sink.publish(events_for("call-a", 0, 5))
    got = poll_for(adapter, source, 5)
    source.rewind(got[1].shard_id, got[1].sequence_number)
    again = poll_for(adapter, source, 4)
    assert [r.sequence_number for r in again] == [r.sequence_number for r in got[1:]]
    sink.publish(events_for("call-a", 5, 1))
    assert [number(r)[1] for r in poll_for(adapter, source, 1)] == [5]
    source.close()


CHECKS = [
    check_publish_then_poll_returns_every_event_once_in_order_per_key,
    check_records_carry_stream_shard_sequence_and_partition_key,
    check_raw_records_arrive_byte_for_byte,
    check_a_poll_with_nothing_new_returns_nothing,
    check_exclusive_checkpoint_resumes_after_the_record,
    check_inclusive_checkpoint_resumes_at_the_record,
    check_close_lets_a_new_source_read_from_the_checkpoint_at_once,
    check_rewind_reads_again_from_the_record,
]
