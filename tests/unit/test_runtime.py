"""The service loop: checkpoints mean done, bad records are dead-lettered, retries lose nothing."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record
from callstream.contract import default_contract
from callstream.errors import RetryableError
from callstream.events import CallEnded, CallStarted, DeadLetter, EndReason, Event
from callstream.runtime import ServiceLoop


class CallsUntilEnded:
    """Test handler: a call is settled once its CallEnded was handled."""

    def __init__(self, fail_times: int = 0) -> None:
        self.seen: list[Event] = []
        self.ended: set[str] = set()
        self.fail_times = fail_times

    def handle(self, event: Event, record: Record) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RetryableError("throttled")
        if isinstance(event, CallStarted) and event.contact_id == "explode":
            raise ValueError("handler bug")
        self.seen.append(event)
        if isinstance(event, CallEnded):
            self.ended.add(event.contact_id)

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.ended

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None


def _started(contact: str) -> CallStarted:
    return CallStarted(contact, "arn", 0)


def _ended(contact: str) -> CallEnded:
    return CallEnded(contact, EndReason.END_OF_STREAM, 0)


def _loop(
    stream: MemoryStream, handler: CallsUntilEnded, checkpoints: dict
) -> tuple[ServiceLoop, MemoryStream]:
    dead = MemoryStream("dead")
    source = MemorySource(stream, checkpoints)
    return ServiceLoop("test", source, handler, MemoryPublisher(dead)), dead


def test_checkpoint_waits_at_the_oldest_open_call_then_moves_past_it() -> None:
    stream = MemoryStream("audio")
    publisher = MemoryPublisher(stream)
    publisher.publish([_started("a"), _started("b"), _ended("b")])
    checkpoints: dict = {}
    loop, _ = _loop(stream, CallsUntilEnded(), checkpoints)
    loop.process(loop.source.poll())
    loop.checkpoint()
    assert checkpoints["shardId-000000000000"] == ("1", True)
    publisher.publish([_ended("a")])
    loop.process(loop.source.poll())
    loop.checkpoint()
    assert checkpoints["shardId-000000000000"] == ("4", False)


def test_a_restarted_loop_replays_every_record_of_unsettled_calls() -> None:
    stream = MemoryStream("audio")
    MemoryPublisher(stream).publish([_started("a"), _started("b"), _ended("b"), _started("c")])
    checkpoints: dict = {}
    first, _ = _loop(stream, CallsUntilEnded(), checkpoints)
    first.process(first.source.poll())
    first.checkpoint()
    handler = CallsUntilEnded()
    second, _ = _loop(stream, handler, checkpoints)  # the first instance was killed
    second.process(second.source.poll())
    assert [getattr(e, "contact_id", None) for e in handler.seen] == ["a", "b", "b", "c"]


def test_undecodable_and_rejected_records_are_dead_lettered_and_the_shard_moves_on() -> None:
    stream = MemoryStream("audio")
    stream.append("k", b"garbage")
    MemoryPublisher(stream).publish([_started("explode"), _started("fine")])
    handler = CallsUntilEnded()
    loop, dead = _loop(stream, handler, {})
    loop.process(loop.source.poll())
    letters = [default_contract().decode(r.data) for r in dead.shards[0]]
    assert all(isinstance(letter, DeadLetter) for letter in letters)
    assert letters[0].data == b"garbage"  # type: ignore[union-attr]
    assert "handler bug" in letters[1].reason  # type: ignore[union-attr]
    assert [e.contact_id for e in handler.seen] == ["fine"]  # type: ignore[union-attr]


def test_retryable_failures_are_retried_until_they_pass() -> None:
    stream = MemoryStream("audio")
    MemoryPublisher(stream).publish([_started("a")])
    handler = CallsUntilEnded(fail_times=2)
    loop, dead = _loop(stream, handler, {})
    loop.process(loop.source.poll(), threading.Event())
    assert len(handler.seen) == 1 and dead.shards[0] == []


class BufferedUntilFlushed(CallsUntilEnded):
    """Test handler that buffers effects: a call is unsettled until flushed."""

    def __init__(self, flush_failures: int = 0, tick_failures: int = 0) -> None:
        super().__init__()
        self.buffered: set[str] = set()
        self.flushes = 0
        self.flush_failures = flush_failures
        self.tick_failures = tick_failures

    def handle(self, event: Event, record: Record) -> None:
        super().handle(event, record)
        self.buffered.add(event.contact_id)  # type: ignore[union-attr]

    def is_settled(self, contact_id: str) -> bool:
        return contact_id not in self.buffered

    def flush(self) -> None:
        if self.flush_failures:
            self.flush_failures -= 1
            raise RetryableError("throttled")
        self.flushes += 1
        self.buffered.clear()

    def tick(self) -> None:
        if self.tick_failures:
            self.tick_failures -= 1
            raise RetryableError("engine busy")


def test_buffered_effects_hold_the_checkpoint_until_flushed() -> None:
    stream = MemoryStream("transcripts")
    MemoryPublisher(stream).publish([_started("a"), _ended("a")])
    checkpoints: dict = {}
    handler = BufferedUntilFlushed()
    loop, _ = _loop(stream, handler, checkpoints)  # type: ignore[arg-type]
    loop.process(loop.source.poll())
    loop.checkpoint()
    assert checkpoints["shardId-000000000000"] == ("1", True)
    loop.flush()
    loop.checkpoint()
    assert checkpoints["shardId-000000000000"] == ("2", False)


def test_the_loop_retries_flush_and_tick_and_flushes_before_its_last_checkpoint() -> None:
    stream = MemoryStream("transcripts")
    MemoryPublisher(stream).publish([_started("a"), _ended("a")])
    checkpoints: dict = {}
    handler = BufferedUntilFlushed(flush_failures=2, tick_failures=2)
    loop, _ = _loop(stream, handler, checkpoints)  # type: ignore[arg-type]
    stop = threading.Event()

    class StopAfterOnePoll:
        def __init__(self, source: MemorySource) -> None:
            self.source = source
            self.stream = source.stream

        def poll(self) -> list[Record]:
            stop.set()
            return self.source.poll()

        def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
            self.source.checkpoint(shard_id, sequence_number, inclusive=inclusive)

        def close(self) -> None:
            self.source.close()

    loop.source = StopAfterOnePoll(loop.source)  # type: ignore[arg-type, assignment]
    loop.run(stop)
    assert handler.flushes >= 1 and handler.tick_failures == 0
    assert checkpoints["shardId-000000000000"] == ("2", False)


def test_the_loop_counts_what_it_handles_and_the_calls_still_open() -> None:
    from callstream.metrics import CALLS_IN_PROGRESS, DEAD_LETTERS, RECORDS, Metrics

    stream = MemoryStream("audio")
    stream.append("k", b"garbage")
    MemoryPublisher(stream).publish([_started("a"), _started("b"), _ended("b")])
    metrics = Metrics("test", "prometheus")
    loop = ServiceLoop(
        "test",
        MemorySource(stream),
        CallsUntilEnded(),
        MemoryPublisher(MemoryStream("d")),
        metrics=metrics,
    )
    loop.process(loop.source.poll())
    loop.checkpoint()
    assert metrics.value(RECORDS, shard="shardId-000000000000") == 4
    assert metrics.value(DEAD_LETTERS) == 1
    assert metrics.value(CALLS_IN_PROGRESS) == 1
    assert 'callstream_calls_in_progress{service="test"} 1' in metrics.prometheus()


class ResumesAt(CallsUntilEnded):
    """Test handler that names the record a restart needs for each call."""

    def __init__(self, points: dict[str, tuple[str, str]]) -> None:
        super().__init__()
        self.points = points

    def resume_point(self, contact_id: str) -> tuple[str, str] | None:
        return self.points.get(contact_id)


def test_checkpoint_keeps_a_resuming_call_from_its_resume_point_on_its_own_shard_only() -> None:
    stream = MemoryStream("audio")
    MemoryPublisher(stream).publish([_started("a"), _started("b"), _started("c"), _started("d")])
    checkpoints: dict = {}
    shard = "shardId-000000000000"
    handler = ResumesAt({"a": (shard, "3"), "b": ("shardId-000000000001", "4")})
    loop, _ = _loop(stream, handler, checkpoints)
    loop.process(loop.source.poll())
    loop.checkpoint()
    assert checkpoints[shard] == ("2", True)  # "b" reports another shard: its first record
    handler.ended.add("b")
    loop.checkpoint()
    assert checkpoints[shard] == ("3", True)  # "a" from its resume point, "c" from its first
