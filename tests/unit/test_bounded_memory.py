"""10,000 short calls through one ingest handler and one transcriber handler.

Memory held by the handlers and the consumer loop, and what `tick()` walks,
must follow the calls in progress, not every call the process has served:
both are measured after 2,000 calls and again after 10,000, and must not grow
between the two. Memory is what tracemalloc still holds from allocations made
in the handlers' own modules and the loop; the in-memory stores and streams the
test keeps are left out (they stand for DynamoDB and Kinesis).
"""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import tracemalloc
from collections.abc import Callable, Generator, Sequence
from typing import Any

from test_ingest_session_scripted import ARN, CONTACT, fragments, pcm
from test_transcriber_recovery import BurstEngine, Clock, chunks, speech

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.events import CallEnded, CallStarted, EndReason, Event, Track
from callstream.progress import MemoryProgress
from callstream.runtime import ServiceLoop
from services.ingest.handler import IngestHandler
from services.ingest.settings import IngestSettings
from services.transcriber.handler import TranscriberHandler

CALLS = 10_000
FIRST_LOOK = 2_000
MEMORY = 500  # ended calls each handler remembers to skip replays (a parameter)
HELD = ("*/services/ingest/*", "*/services/transcriber/*", "*/callstream/runtime.py")


class OneFragmentPerCall:
    """GetMedia of any call: one 1 s fragment tagged with that call's ContactId."""

    def __init__(self) -> None:
        self.template = fragments(pcm(1.0, 1), pcm(1.0, 2))[0]
        self.region = "us-east-1"

    def get_fragments(self, stream_arn: str, numbers: list[str]) -> Generator[bytes, None, None]:
        yield from ()

    def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Generator[bytes, None, None]:
        contact = stream_arn.rsplit("/", 1)[-1]
        yield self.template.replace(CONTACT.encode(), contact.encode())

    def endpoint_stale(self, stream_arn: str, api: str = "GET_MEDIA") -> bool:
        return False

    def release(self, stream_arn: str) -> None:
        pass


class CountingSink:
    """An audio stream that counts CallEnded and keeps nothing."""

    stream = "audio"

    def __init__(self) -> None:
        self.ended = 0
        self._lock = threading.Lock()  # call sessions publish from the pool's threads

    def publish(self, events: Sequence[Event]) -> None:
        with self._lock:
            self.ended += sum(isinstance(e, CallEnded) for e in events)


class ForgetfulProgress(MemoryProgress):
    """The progress twin, dropping a call's item once it is over (the table's TTL):
    the table's memory is DynamoDB's, not the process's."""

    def release(self, contact_id: str, owner: str) -> bool:
        done = super().release(contact_id, owner)
        self.items.pop(contact_id, None)
        return done

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        saved = super().save(contact_id, state, version)
        if state.get("done"):
            self.items.pop(contact_id, None)
        return saved


def _held_bytes() -> int:
    gc.collect()  # what only a cycle holds is not held
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, pattern) for pattern in HELD]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


def _contact(n: int) -> str:
    return f"{n:08d}-d2ed-476a-ad11-f496ab09b3f8"  # as long as CONTACT: the tag is patched


def _measure(
    run_until: Callable[[int], None], walked: Callable[[], int]
) -> list[tuple[int, int, int]]:
    """(calls, bytes held, entries tick walks) after FIRST_LOOK and after CALLS calls."""
    looks = []
    tracemalloc.start()
    try:
        for upto in (FIRST_LOOK, CALLS):
            run_until(upto)
            looks.append((upto, _held_bytes(), walked()))
    finally:
        tracemalloc.stop()
    print(looks)
    return looks


def _assert_flat(looks: list[tuple[int, int, int]]) -> None:
    (_, early_bytes, early_walk), (_, late_bytes, late_walk) = looks
    # 8,000 more calls: any per-call leak of even 32 bytes would show as 256 KB.
    assert late_bytes - early_bytes < 128 * 1024, looks
    assert late_walk <= early_walk <= 1, looks


def test_ten_thousand_calls_through_one_ingest_handler_hold_flat_memory_and_tick() -> None:
    settings = IngestSettings.from_env({"CALLSTREAM_IDLE_TIMEOUT_S": "1"})
    sink = CountingSink()
    handler = IngestHandler(
        settings,
        progress=ForgetfulProgress(),
        lease=10_000,
        media=OneFragmentPerCall(),
        audio=sink,
        published=None,
        ended_memory=MEMORY,
    )
    calls = MemoryStream("calls", shard_count=2)
    loop = ServiceLoop("ingest", MemorySource(calls), handler, MemoryPublisher(MemoryStream("dl")))
    started = 0

    def run_until(upto: int) -> None:
        nonlocal started
        while started < upto:
            batch = [
                CallStarted(_contact(n), f"{ARN}/{_contact(n)}", 0)
                for n in range(started, min(upto, started + 100))
            ]
            MemoryPublisher(calls).publish(batch)
            started += len(batch)
            loop.process(loop.source.poll())
            _settle(lambda upto=started: sink.ended >= upto, handler.tick)
            loop.checkpoint()
        _settle(lambda: not handler.calls, handler.tick)
        loop.checkpoint()

    try:
        looks = _measure(run_until, lambda: len(handler.calls))
    finally:
        handler.close()
    assert sink.ended == CALLS
    assert sum(len(open_calls) for open_calls in loop._open.values()) == 0
    _assert_flat(looks)


def _settle(done: Callable[[], bool], tick: Callable[[], None]) -> None:
    deadline = time.monotonic() + 60
    tick()
    while not done():
        assert time.monotonic() < deadline, "calls did not end"
        time.sleep(0.002)
        tick()


def test_ten_thousand_calls_through_one_transcriber_handler_hold_flat_memory_and_tick() -> None:
    clock = Clock()
    out = MemoryStream("transcripts")
    published = MemoryPublisher(out)
    handler = TranscriberHandler(
        BurstEngine(clock),
        published,
        "en-US",
        clock=lambda: clock.now,
        progress=ForgetfulProgress(),
        done_memory=MEMORY,
    )
    audio = MemoryStream("audio")
    loop = ServiceLoop("transcriber", MemorySource(audio), handler, MemoryPublisher(audio))
    word = list(chunks(speech(1, period_ms=512, word_ms=256, lead_ms=128), 128))
    served = 0

    def run_until(upto: int) -> None:
        nonlocal served
        while served < upto:
            contact = _contact(served)
            events: list[Event] = [CallStarted(contact, "arn", 0)]
            events += [dataclasses.replace(c, contact_id=contact) for c in word]
            counts = {Track.FROM_CUSTOMER.value: len(word)}
            events.append(
                CallEnded(
                    contact,
                    EndReason.END_OF_STREAM,
                    0,
                    chunk_counts=counts,
                    call_start_time_ms=0,
                )
            )
            MemoryPublisher(audio).publish(events)
            for record in loop.source.poll():
                clock.now += 0.128
                loop.process([record])
            handler.tick()
            loop.checkpoint()
            out.shards[0].clear()  # the transcripts stream is not the handler's memory
            served += 1
        handler.engine.streams.clear()  # the test double keeps every stream it opened

    looks = _measure(run_until, lambda: len(handler.calls) + len(handler.records))
    assert len(handler.done) == MEMORY
    assert handler.outbox == {}
    _assert_flat(looks)
