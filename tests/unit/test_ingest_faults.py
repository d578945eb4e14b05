"""Ingest at every fault: each publish and progress write failed in turn, and killed there.

A two-track Connect call (three KVS fragments) runs through the production
`IngestHandler` (its pool, `Takeover`, `CallOwnership`, `CallSession`) with
a KVS test double that serves each GetMedia connection from its start
selector, the in-memory progress store, an audio stream kept as a list, and
the read-back (`PublishedEvents`) replaced by a double reading that list.
Every publish and every progress write of the session's thread (claim,
save, release: "save" effects; the heartbeat timer's writes are not
numbered) is failed in turn by the fault-at-every-step harness
(tests/effect_faults.py):

- `raise-before` / `raise-after`: the store refuses, or stores and the answer
  is lost (a publish raising StoreUnavailable after its records were stored);
  the instance goes on as production does: a failed run of the call is run
  again from `tick` (the backoff before it is zeroed here);
- `crash-before` / `crash-after`: the instance dies there; a new one (another
  worker, once the dead one's heartbeat is a lease old) takes the call over,
  as the emulator takeover tests do at eight chosen points.

Then the audio stream, after dropping repeats of a (track, sequence), must
carry exactly the input PCM per track, one CallStarted first and one
CallEnded last, the progress must say `ended`, and a CallStarted replayed to
another instance afterwards (the calls shard's checkpoint lost) must publish
nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Generator, Sequence
from typing import Any

import pytest
from effect_faults import MODES, Crash, Faults, FaultySink, until_done
from test_ingest_session_scripted import ARN, CONTACT, fragments, pcm

from callstream.bus.ports import Record
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, Event, Track
from callstream.progress import Claim, MemoryProgress
from services.ingest.handler import IngestHandler
from services.ingest.settings import IngestSettings

LEASE_MS = 10_000
SECONDS = 3.0  # three fragments of 1.024 s (the last one shorter)
PIECE = 4000  # bytes per read of a GetMedia body: several publishes per fragment
FIRST = str(10**46)  # the fragment number `fragments` gives the first fragment


@dataclasses.dataclass
class KvsStream:
    """A call's KVS stream, as GetMediaForFragmentList and GetMedia serve it.

    A GetMedia connection starts where its selector says: after the fragment
    of a continuation token, at a fragment number (inclusive, one reading of
    the documentation; the session handles both), or at the stream's start for
    NOW (the stream holds this call only). It ends at the last fragment, as a
    stream whose producer has finished does."""

    parts: list[bytes]
    region: str = "us-east-1"
    selectors: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def numbers(self) -> list[str]:
        return [str(10**46 + index) for index in range(len(self.parts))]

    def get_fragments(self, stream_arn: str, numbers: list[str]) -> Generator[bytes, None, None]:
        yield from _pieces(b"".join(self.parts[self.numbers().index(n)] for n in numbers))

    def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Generator[bytes, None, None]:
        self.selectors.append(dict(selector))
        kind = selector["StartSelectorType"]
        if kind == "CONTINUATION_TOKEN":
            start = self.numbers().index(selector["ContinuationToken"]) + 1
        elif kind == "FRAGMENT_NUMBER":
            start = self.numbers().index(selector["AfterFragmentNumber"])
        else:
            start = 0
        yield from _pieces(b"".join(self.parts[start:]))

    def endpoint_stale(self, stream_arn: str, api: str = "GET_MEDIA") -> bool:
        return False

    def release(self, stream_arn: str) -> None:
        pass


def _pieces(data: bytes) -> Generator[bytes, None, None]:
    for offset in range(0, len(data), PIECE):
        yield data[offset : offset + PIECE]


@dataclasses.dataclass
class AudioStream:
    """The audio stream: every event stored, in order (an EventSink)."""

    stream: str = "audio"
    events: list[Event] = dataclasses.field(default_factory=list)

    def publish(self, events: Sequence[Event]) -> None:
        self.events.extend(events)


class ReadBack:
    """`PublishedEvents` over the audio list: the contact's events stored so far.

    The list keeps no arrival times, so the whole call is read back, not only
    the window from a little before the last save; `core.advance` ignores what
    the saved state already covers, so the answer is the same."""

    def __init__(self, audio: AudioStream) -> None:
        self.audio = audio

    def since(self, contact_id: str, since_ms: int) -> list[Event]:
        return [e for e in self.audio.events if getattr(e, "contact_id", None) == contact_id]


class FaultyOwnedProgress:
    """An owned progress store whose writes from the session's thread are effects ("save").

    Claims, saves and releases are numbered; heartbeats come from a timer
    thread, so numbering them would make the effect order depend on timing."""

    def __init__(self, inner: MemoryProgress, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    def load(self, contact_id: str) -> dict[str, Any] | None:
        return self.inner.load(contact_id)

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        return self.faults.effect("save", lambda: self.inner.save(contact_id, state, version))

    def claim(self, contact_id: str, owner: str, lease_ms: int) -> Claim:
        return self.faults.effect("save", lambda: self.inner.claim(contact_id, owner, lease_ms))

    def save_owned(self, contact_id: str, owner: str, state: dict[str, Any], version: int) -> bool:
        return self.faults.effect(
            "save", lambda: self.inner.save_owned(contact_id, owner, state, version)
        )

    def heartbeat(self, contact_id: str, owner: str) -> bool:
        return self.inner.heartbeat(contact_id, owner)

    def release(self, contact_id: str, owner: str) -> bool:
        return self.faults.effect("save", lambda: self.inner.release(contact_id, owner))


@dataclasses.dataclass
class World:
    """What outlives an instance: KVS, the audio stream, the progress table, the clock."""

    customer: bytes = dataclasses.field(default_factory=lambda: pcm(SECONDS, 21))
    agent: bytes = dataclasses.field(default_factory=lambda: pcm(SECONDS, 22))
    audio: AudioStream = dataclasses.field(default_factory=AudioStream)
    now_ms: int = 1_700_000_000_000  # the progress table's clock (heartbeats, claims)
    store: MemoryProgress = dataclasses.field(init=False)
    kvs: KvsStream = dataclasses.field(init=False)
    workers: int = 0

    def __post_init__(self) -> None:
        self.store = MemoryProgress(clock_ms=lambda: self.now_ms)
        self.kvs = KvsStream(fragments(self.customer, self.agent))

    @property
    def call(self) -> CallStarted:
        return CallStarted(CONTACT, ARN, 0, start_fragment_number=FIRST)


def run_instance(world: World, faults: Faults) -> None:
    """A new ingest instance is handed the CallStarted and ticked until the call is settled.

    Every instance after the first is another worker, started once the
    previous one's heartbeat is a lease old (it died). Raises Crash if killed."""
    world.workers += 1
    if world.workers > 1:
        world.now_ms += LEASE_MS + 1
    settings = IngestSettings.from_env(
        {"CALLSTREAM_WORKER_ID": f"worker-{world.workers}", "CALLSTREAM_MAX_CALLS": "2"}
    )
    handler = IngestHandler(
        settings,
        progress=FaultyOwnedProgress(world.store, faults),  # type: ignore[arg-type]
        lease=LEASE_MS,
        media=world.kvs,
        audio=FaultySink(world.audio, faults),
        published=ReadBack(world.audio),  # type: ignore[arg-type]
    )
    try:
        handler.handle(world.call, Record("calls", "shardId-0", "1", CONTACT, b""))
        for _ in range(40):
            if handler.is_settled(CONTACT):
                return
            running = handler.calls[CONTACT].future
            if running is not None and isinstance(running.exception(timeout=60), Crash):
                raise Crash(f"instance {world.workers} killed")
            handler.tick()
        raise AssertionError("the call did not settle")
    finally:
        handler.close()


@pytest.fixture(autouse=True)
def _no_backoff_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed run of a call is run again at the next tick."""
    monkeypatch.setattr("services.ingest.handler.RETRY_MAX_S", 0.0)


def exactly_the_input(world: World) -> int:
    """Assert the audio stream carries the call exactly once; return the repeated chunks."""
    events = world.audio.events
    first: dict[tuple[Track, int], AudioChunkCaptured] = {}
    repeats = 0
    for chunk in (e for e in events if isinstance(e, AudioChunkCaptured)):
        key = (chunk.track, chunk.sequence)
        if key in first:
            assert chunk == first[key], f"{key} published twice with different content"
            repeats += 1
        else:
            first[key] = chunk
    for track, expected in (
        (Track.FROM_CUSTOMER, world.customer),
        (Track.TO_CUSTOMER, world.agent),
    ):
        mine = sorted((c for (t, _), c in first.items() if t is track), key=lambda c: c.sequence)
        assert [c.sequence for c in mine] == list(range(len(mine))), f"{track}: a chunk missing"
        assert b"".join(c.pcm for c in mine) == expected, f"{track}: PCM differs"
    assert [type(e) for e in events].count(CallStarted) == 1
    assert [type(e) for e in events].count(CallEnded) == 1
    assert isinstance(events[0], CallStarted) and isinstance(events[-1], CallEnded)
    assert events[-1].chunk_counts == {t.value: sum(k[0] is t for k in first) for t in Track}
    state = world.store.load(CONTACT)
    assert state is not None and state["ended"]
    return repeats


def replay_publishes_nothing(world: World) -> None:
    """The CallStarted again, to another instance: the call is found ended."""
    before = list(world.audio.events)
    run_instance(world, Faults())
    assert world.audio.events == before, "a replayed CallStarted published again"


def _undisturbed(mode: str = "raise-before") -> tuple[World, list[str]]:
    world, faults = World(), Faults(mode=mode)
    run_instance(world, faults)
    return world, faults.seen


def test_an_undisturbed_call_is_published_once_and_saved_ended() -> None:
    world, seen = _undisturbed()
    assert exactly_the_input(world) == 0
    assert seen.count("publish") >= 10 and seen.count("save") >= 6
    assert world.kvs.selectors == [
        {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": FIRST}
    ]
    assert "owner" not in world.store.items[CONTACT]  # released
    replay_publishes_nothing(world)


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_at_any_publish_or_save_publishes_the_call_exactly_once(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, seen = _undisturbed(mode)
    repeats = 0
    for k in range(len(seen)):
        caplog.clear()
        world, faults = World(), Faults(fail_at=k, mode=mode)
        with caplog.at_level(logging.WARNING):
            _, crashes = until_done(lambda world=world, faults=faults: run_instance(world, faults))
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired, where
        assert crashes == (1 if mode.startswith("crash") else 0), where
        repeats += exactly_the_input(world)
        if mode.startswith("raise"):  # one instance all along: it never thinks the call taken
            taken = [r.getMessage() for r in caplog.records if "another instance" in r.getMessage()]
            assert not taken, f"{where}: {taken}"
        replay_publishes_nothing(world)
    print(f"{mode}: {len(seen)} effects failed in turn, {repeats} repeated chunk records")
    assert repeats == 0
