"""Ingest sessions under ownership, with a scripted media edge and the in-memory progress store.

How often progress is written, where a resumed call starts reading, what a
stop and a lost call do, and the handler's wait for a call held elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
from test_ingest_session_scripted import ARN, CONTACT, ListSink, ScriptedMedia, fragments, pcm

from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, Event, Track
from callstream.progress import MemoryProgress
from services.ingest.ownership import CallOwnership, Heartbeats, OwnershipLost
from services.ingest.session import CallSession, SessionStopped
from services.ingest.takeover import Outcome, Takeover

LEASE_MS = 10_000


def ownership(store: MemoryProgress, worker: str = "a") -> CallOwnership:
    own = CallOwnership(store, CONTACT, worker, LEASE_MS)
    assert own.claim().granted
    return own


def session(media: Any, sink: Any, **options: Any) -> CallSession:
    call = CallStarted(contact_id=CONTACT, stream_arn=ARN, requested_at_ms=0)
    return CallSession(call, media, sink, 128, **options)


def test_progress_is_saved_once_per_fragment_and_released_at_the_end() -> None:
    store = MemoryProgress()
    parts = fragments(pcm(60.0, 1), pcm(60.0, 2))
    own = ownership(store)
    ended = session(ScriptedMedia([(b"".join(parts), None)]), ListSink(), ownership=own).run()
    assert isinstance(ended, CallEnded)
    # claim + CallStarted + one per fragment + CallEnded + release
    assert store.writes == 1 + 1 + len(parts) + 1 + 1
    print(f"{len(parts)} fragments (60 s): {store.writes} progress writes")
    state = store.load(CONTACT)
    assert state is not None and state["ended"] and state["fragments"] == len(parts)
    assert "owner" not in store.items[CONTACT]


def test_a_resumed_call_reads_on_with_the_saved_token_and_does_not_start_again() -> None:
    customer, agent = pcm(4.0, 3), pcm(4.0, 4)
    parts = fragments(customer, agent)
    store = MemoryProgress()
    stop = threading.Event()

    class StopAfterTwo(ListSink):
        def publish(self, events: Sequence[Event]) -> None:
            super().publish(events)
            if sum(isinstance(e, AudioChunkCaptured) for e in self.events) >= 2 * 8 + 3:
                stop.set()

    first = StopAfterTwo()
    with pytest.raises(SessionStopped):
        session(
            ScriptedMedia([(b"".join(parts), None)]), first, ownership=ownership(store), stop=stop
        ).run()
    state = store.load(CONTACT)
    assert state is not None and state["started"] and not state["ended"]
    media, second = ScriptedMedia([(b"".join(parts[1:]), None)]), ListSink()
    session(media, second, ownership=ownership(store, "b"), resume=state).run()
    assert media.selectors[0] == {
        "StartSelectorType": "CONTINUATION_TOKEN",
        "ContinuationToken": state["continuation_token"],
    }
    assert not any(isinstance(e, CallStarted) for e in second.events)
    both = ListSink(events=first.events + second.events)
    assert both.pcm(Track.FROM_CUSTOMER) == customer
    assert both.pcm(Track.TO_CUSTOMER) == agent


def test_a_save_refused_stops_the_session_without_another_publish() -> None:
    store = MemoryProgress()
    parts = fragments(pcm(4.0, 5), pcm(4.0, 6))
    own = ownership(store)
    store.items[CONTACT]["owner"] = "thief"  # taken while we were not looking
    sink = ListSink()
    with pytest.raises(OwnershipLost):
        session(ScriptedMedia([(b"".join(parts), None)]), sink, ownership=own).run()
    assert [type(e) for e in sink.events] == [CallStarted]  # the save after it was refused
    assert store.items[CONTACT]["owner"] == "thief"


def test_publishing_stops_when_ownership_cannot_be_confirmed() -> None:
    store = MemoryProgress()
    now = [0.0]
    own = CallOwnership(store, CONTACT, "a", LEASE_MS, monotonic=lambda: now[0])
    assert own.claim().granted
    own.confirm()
    now[0] = 7.0  # past 2/3 of the lease: renewed first
    own.confirm()
    store.items[CONTACT]["owner"] = "b"
    now[0] = 14.0
    with pytest.raises(OwnershipLost):
        own.confirm()


def test_heartbeats_renew_only_calls_that_are_due() -> None:
    store = MemoryProgress()
    now = [0.0]
    own = CallOwnership(store, CONTACT, "a", LEASE_MS, monotonic=lambda: now[0])
    assert own.claim().granted
    beats = Heartbeats(LEASE_MS)
    beats._held[CONTACT] = own  # no thread: beat by hand
    writes = store.writes
    beats.beat()
    assert store.writes == writes
    now[0] = LEASE_MS / 3000
    beats.beat()
    assert store.writes == writes + 1


def test_a_call_held_by_a_live_owner_waits_and_an_ended_one_is_settled() -> None:
    store = MemoryProgress()
    takeover = Takeover(store, "b", LEASE_MS, None, Heartbeats(LEASE_MS))
    call = CallStarted(contact_id=CONTACT, stream_arn=ARN, requested_at_ms=0)
    assert store.claim(CONTACT, "a", LEASE_MS).granted

    def never(state: Any, own: Any) -> CallSession:
        raise AssertionError("the session must not run")

    assert takeover.run(call, never) is Outcome.WAITING
    assert store.save_owned(CONTACT, "a", {"ended": True}, 5)
    assert takeover.run(call, never) is Outcome.ENDED


def test_a_throttled_heartbeat_is_retried_within_the_lease_before_publishing() -> None:
    from callstream.errors import RetryableError

    class Throttled(MemoryProgress):
        failures = 3

        def heartbeat(self, contact_id: str, owner: str) -> bool:
            if self.failures:
                self.failures -= 1
                raise RetryableError("throttled")
            return super().heartbeat(contact_id, owner)

    store, now = Throttled(), [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    own = CallOwnership(store, CONTACT, "a", LEASE_MS, monotonic=lambda: now[0], sleep=sleep)
    assert own.claim().granted
    now[0] = 7.0
    own.confirm()  # three throttled attempts, then renewed: publishing may go on
    assert store.failures == 0 and not own.lost
    store.failures = 1000
    now[0] += 7.0
    with pytest.raises(OwnershipLost, match="within a lease"):
        own.confirm()
    assert now[0] - 7.0 >= LEASE_MS / 1000  # gave up only once a whole lease had passed
