"""The transcriber handler fails at every effect and still publishes every final once.

A two-track call through the production handler and service loop over the
in-memory bus, with the burst test double as engine (see
test_transcriber_recovery) and the in-memory progress twin. Every publish and
progress save (and, for kills, every checkpoint) is failed in turn by the
fault-at-every-step harness (`tests/effect_faults.py`); the outputs are
compared with an undisturbed run's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import pytest
from effect_faults import MODES, Faults, FaultyProgress, FaultySink, FaultySource, until_done
from effect_faults import retried as _retried
from test_transcriber_recovery import BurstEngine, C, Clock, chunks, speech, truth

from callstream.asr.port import Hypothesis, RecognitionStream, SpeechEngine
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import EventSink
from callstream.contract import default_contract
from callstream.errors import StoreUnavailable, partly_published
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    Track,
    TranscriptSegmentProduced,
)
from callstream.progress import MemoryProgress
from callstream.runtime import ServiceLoop
from services.transcriber.handler import TranscriberHandler

SHARD = "shardId-000000000000"
WORDS = 3
SPEECH = {"period_ms": 1500, "word_ms": 600, "lead_ms": 300}
AGENT = {**SPEECH, "lead_ms": 0}  # the agent speaks first: its finals run ahead


@dataclasses.dataclass
class World:
    """What survives a kill: the streams, the progress store, the checkpoints."""

    audio: MemoryStream
    out: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("transcripts"))
    letters: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("dead"))
    store: MemoryProgress = dataclasses.field(default_factory=MemoryProgress)
    checkpoints: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    def events(self) -> list[Event]:
        return [default_contract().decode(r.data) for r in self.out.shards[0]]


def two_track_call(audio: MemoryStream, order: Callable[[list[Event]], list[Event]] = list) -> int:
    """CallStarted, both tracks' chunks interleaved, CallEnded; returns the record count."""
    customer = list(chunks(speech(WORDS, **SPEECH), 128))
    agent = [
        dataclasses.replace(c, track=Track.TO_CUSTOMER) for c in chunks(speech(WORDS, **AGENT), 128)
    ]
    interleaved: list[Event] = [e for pair in zip(customer, agent, strict=True) for e in pair]
    end = CallEnded(
        C,
        EndReason.END_OF_STREAM,
        0,
        chunk_counts={
            Track.FROM_CUSTOMER.value: len(customer),
            Track.TO_CUSTOMER.value: len(agent),
        },
        call_start_time_ms=0,
    )
    events = [CallStarted(C, "arn", 0), *order(interleaved), end]
    MemoryPublisher(audio).publish(events)
    return len(events)


def run_instance(
    world: World,
    faults: Faults,
    engine: Callable[[Clock], SpeechEngine] = BurstEngine,
    sink: Callable[[MemoryPublisher], EventSink] = lambda out: out,
) -> None:
    """One transcriber instance from the world's checkpoint to the end of the call;
    `sink` wraps the transcripts stream's publisher (under the fault harness's)."""
    clock = Clock()
    handler = TranscriberHandler(
        engine(clock),
        FaultySink(sink(MemoryPublisher(world.out)), faults),
        "en-US",
        clock=lambda: clock.now,
        progress=FaultyProgress(world.store, faults),  # type: ignore[arg-type]
        save_interval_s=0.0,
    )
    source = FaultySource(MemorySource(world.audio, world.checkpoints), faults)
    loop = ServiceLoop("transcriber", source, handler, MemoryPublisher(world.letters))
    for record in source.poll():
        clock.now += 0.128
        loop.process([record])
        _retried(handler.tick)
        loop.checkpoint()
    for _ in range(40):
        clock.now += 0.5
        _retried(handler.tick)
        loop.checkpoint()


def finals(events: list[Event]) -> dict[str, tuple[str, int, int]]:
    return {
        e.segment_id: (e.transcript, e.start_ms, e.end_ms)
        for e in events
        if isinstance(e, TranscriptSegmentProduced) and not e.is_partial
    }


def distinct(events: list[Event]) -> list[Event]:
    """The stream with repeats of an earlier record removed (consumers dedupe by id)."""
    seen: list[Event] = []
    for event in events:
        if event not in seen:
            seen.append(event)
    return seen


@pytest.fixture(autouse=True)
def _no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("callstream.runtime.time.sleep", lambda _s: None)


def _undisturbed() -> tuple[World, int, list[str]]:
    world = World(MemoryStream("audio"))
    total = two_track_call(world.audio)
    faults = Faults()
    run_instance(world, faults)
    return world, total, faults.seen


def test_an_undisturbed_call_gives_every_final_of_both_tracks_and_one_call_ended() -> None:
    world, total, seen = _undisturbed()
    got = sorted(finals(world.events()).values())
    assert got == sorted(truth(WORDS, **SPEECH) + truth(WORDS, **AGENT))
    assert [type(e) for e in world.events()].count(CallEnded) == 1
    assert world.checkpoints[SHARD] == (str(total), False)
    assert "publish" in seen and "save" in seen


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_at_any_effect_leaves_the_same_outputs(mode: str) -> None:
    reference, total, _ = _undisturbed()
    count = len(_seen_for(mode))
    assert count >= 15  # every publish and save of the call (and, for kills, checkpoints)
    for k in range(count):
        world = World(MemoryStream("audio"))
        two_track_call(world.audio)
        faults = Faults(fail_at=k, mode=mode)
        _, crashes = until_done(lambda world=world, faults=faults: run_instance(world, faults))
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired, where
        assert crashes == (1 if mode.startswith("crash") else 0), where
        events = world.events()
        if mode == "raise-before":  # nothing reached the stream twice
            assert events == reference.events(), where
        else:  # a repeat is the same record again; consumers dedupe it by id
            expected = reference.events() if mode == "raise-after" else _finals_and_end(reference)
            got = distinct(events) if mode == "raise-after" else _finals_and_end(world)
            assert got == expected, where
        assert world.letters.shards[0] == [], where
        assert world.checkpoints[SHARD] == (str(total), False), where
        saved = world.store.load(C)
        assert saved is not None and saved["done"], where


def _seen_for(mode: str) -> list[str]:
    world = World(MemoryStream("audio"))
    two_track_call(world.audio)
    faults = Faults(mode=mode)
    run_instance(world, faults)
    return faults.seen


def _finals_and_end(world: World) -> list[Event]:
    """Finals (first of each id) and the CallEnded, in stream order: what a kill keeps exact.

    Partials may repeat or differ after a kill: the new engine hears the audio
    since the last final again."""
    kept = [
        e
        for e in distinct(world.events())
        if isinstance(e, CallEnded)
        or (isinstance(e, TranscriptSegmentProduced) and not e.is_partial)
    ]
    first: dict[str, Event] = {}
    for e in kept:
        first.setdefault(getattr(e, "segment_id", "end"), e)
    return list(first.values())


# --- the two losses the fault issue reproduced ------------------------------------------


class FailOnce:
    """A sink that refuses, once, the first publish holding an event that `matches`."""

    def __init__(self, inner: MemoryPublisher, matches: Callable[[Event], bool]) -> None:
        self.inner, self.stream, self.matches, self.failed = inner, inner.stream, matches, False

    def publish(self, events: Sequence[Event]) -> None:
        if not self.failed and any(self.matches(e) for e in events):
            self.failed = True
            raise StoreUnavailable("PutRecords throttled past its deadline")
        self.inner.publish(events)


def test_a_failed_publish_of_the_last_final_and_call_ended_is_published_on_retry() -> None:
    world = World(MemoryStream("audio"))
    total = two_track_call(world.audio)
    fail_once: list[FailOnce] = []

    def sink(out: MemoryPublisher) -> EventSink:
        fail_once.append(FailOnce(out, lambda e: isinstance(e, CallEnded)))
        return fail_once[-1]

    run_instance(world, Faults(), sink=sink)
    assert fail_once[0].failed
    events = world.events()
    assert [type(e) for e in events].count(CallEnded) == 1
    assert len(finals(events)) == 2 * WORDS
    assert world.checkpoints[SHARD] == (str(total), False)


def _swap_after(first_uncovered: int) -> Callable[[list[Event]], list[Event]]:
    """Store the customer's chunk `first_uncovered + 1` before `first_uncovered`, as a
    PutRecords that retried only its failed entry does."""

    def order(events: list[Event]) -> list[Event]:
        def is_chunk(e: Event, n: int) -> bool:
            return (
                isinstance(e, AudioChunkCaptured)
                and e.track is Track.FROM_CUSTOMER
                and e.sequence == n
            )

        out = [e for e in events if not is_chunk(e, first_uncovered)]
        later = next(i for i, e in enumerate(out) if is_chunk(e, first_uncovered + 1))
        out.insert(later + 1, next(e for e in events if is_chunk(e, first_uncovered)))
        return out

    return order


def test_a_takeover_after_a_reordered_batch_skips_no_chunk_and_the_call_settles() -> None:
    # The customer's first word ends at 900 ms: chunk 7 (896-1024 ms) is the first its
    # saved final does not wholly cover, and it is stored after chunk 8. The agent's
    # finals run ahead, so the customer's chunks decide where the call resumes.
    world = World(MemoryStream("audio"))
    total = two_track_call(world.audio, order=_swap_after(7))
    decoded = [default_contract().decode(r.data) for r in world.audio.shards[0]]

    def index_of(track: Track, sequence: int) -> int:
        return next(
            i
            for i, e in enumerate(decoded)
            if isinstance(e, AudioChunkCaptured) and e.track is track and e.sequence == sequence
        )

    _run_limited(world, limit=index_of(Track.TO_CUSTOMER, 17) + 1)  # then killed
    saved = world.store.load(C)
    assert saved is not None and saved["tracks"][Track.FROM_CUSTOMER.value]["resume_sequence"] == 7
    # Resumes at chunk 8, stored first, not at chunk 7, whose position is later.
    assert world.checkpoints[SHARD] == (str(index_of(Track.FROM_CUSTOMER, 8) + 1), True)

    run_instance(world, Faults())  # the new owner, from the checkpoint
    expected = truth(WORDS, **SPEECH) + truth(WORDS, **AGENT)
    assert sorted(finals(world.events()).values()) == sorted(expected)
    assert CallEnded in [type(e) for e in world.events()]
    assert world.checkpoints[SHARD] == (str(total), False)


def _run_limited(world: World, limit: int) -> None:
    clock = Clock()
    handler = TranscriberHandler(
        BurstEngine(clock),
        MemoryPublisher(world.out),
        "en-US",
        clock=lambda: clock.now,
        progress=world.store,
        save_interval_s=0.0,
    )
    loop = ServiceLoop(
        "transcriber",
        MemorySource(world.audio, world.checkpoints),
        handler,
        MemoryPublisher(world.letters),
    )
    for record in loop.source.poll()[:limit]:
        clock.now += 0.128
        loop.process([record])
        handler.tick()
        loop.checkpoint()


class StoresHalf:
    """A sink whose publishes of two or more events store their first half and then fail,
    saying so (as `KinesisPublisher` does when a later record is refused)."""

    def __init__(self, inner: MemoryPublisher) -> None:
        self.inner, self.stream, self.cut = inner, inner.stream, 0

    def publish(self, events: Sequence[Event]) -> None:
        if len(events) < 2:
            self.inner.publish(events)
            return
        half = len(events) // 2
        self.inner.publish(events[:half])
        self.cut += 1
        stored = [True] * half + [False] * (len(events) - half)
        raise partly_published(StoreUnavailable("a later record refused"), stored)


class Batching:
    """The burst double with results held back and handed out every 40th poll, as
    Transcribe hands several results at once: the core then emits several events."""

    name = "batching-burst-test-double"

    def __init__(self, inner: BurstEngine) -> None:
        self.inner = inner

    def open_stream(self, *, contact_id: str, track: str, language: str) -> _Held:
        return _Held(self.inner.open_stream(contact_id=contact_id, track=track, language=language))


def _batching(clock: Clock) -> SpeechEngine:
    return Batching(BurstEngine(clock))


class _Held:
    def __init__(self, inner: RecognitionStream) -> None:
        self.inner, self.held, self.polls = inner, list[Hypothesis](), 0

    def send(self, pcm: bytes) -> None:
        self.inner.send(pcm)

    def poll(self) -> list[Hypothesis]:
        self.held += self.inner.poll()
        self.polls += 1
        if self.polls % 40:
            return []
        out, self.held = self.held, []
        return out

    def close(self) -> list[Hypothesis]:
        out, self.held = self.held + self.inner.close(), []
        return out


def test_a_publish_that_stored_part_of_the_outbox_is_finished_without_repeats() -> None:
    reference = World(MemoryStream("audio"))
    total = two_track_call(reference.audio)
    run_instance(reference, Faults(), engine=_batching)
    assert len(finals(reference.events())) == 2 * WORDS

    world = World(MemoryStream("audio"))
    two_track_call(world.audio)
    cutters: list[StoresHalf] = []

    def sink(out: MemoryPublisher) -> EventSink:
        cutters.append(StoresHalf(out))
        return cutters[-1]

    run_instance(world, Faults(), engine=_batching, sink=sink)
    assert cutters[0].cut >= 3  # several publishes were cut in two
    assert world.events() == reference.events()  # the same stream: nothing twice, nothing lost
    assert world.checkpoints[SHARD] == (str(total), False)
    saved = world.store.load(C)
    assert saved is not None and saved["done"]


@pytest.mark.parametrize("mode", MODES)
def test_partly_stored_publishes_with_a_failure_at_any_effect_leave_the_same_outputs(
    mode: str,
) -> None:
    # Partly stored publishes together with a failure, or a kill, at every effect.
    reference = World(MemoryStream("audio"))
    total = two_track_call(reference.audio)
    run_instance(reference, Faults(), engine=_batching)
    probe = World(MemoryStream("audio"))
    two_track_call(probe.audio)
    counted = Faults(mode=mode)
    run_instance(probe, counted, engine=_batching, sink=StoresHalf)
    assert len(counted.seen) >= 10
    for k in range(len(counted.seen)):
        world = World(MemoryStream("audio"))
        two_track_call(world.audio)
        faults = Faults(fail_at=k, mode=mode)
        _, crashes = until_done(
            lambda world=world, faults=faults: run_instance(
                world, faults, engine=_batching, sink=StoresHalf
            )
        )
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired and crashes == (1 if mode.startswith("crash") else 0), where
        if mode == "raise-before":  # nothing reached the stream twice
            assert world.events() == reference.events(), where
        elif mode == "raise-after":  # a repeat is the same record again
            assert distinct(world.events()) == reference.events(), where
        else:  # after a kill the tracks' finals may interleave differently
            got, expected = _finals_and_end(world), _finals_and_end(reference)
            assert sorted(map(repr, got)) == sorted(map(repr, expected)), where
            assert isinstance(got[-1], CallEnded), where
        assert world.letters.shards[0] == [], where
        assert world.checkpoints[SHARD] == (str(total), False), where
