"""The progress store contract, for DynamoDB (on the emulator) and the in-memory twin.

Plain versioned saves (as the transcriber uses them) and per-call ownership
(as ingest uses it): claim, owner-conditional saves, heartbeats, release.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from callstream.progress import DynamoProgress, MemoryProgress

LEASE_MS = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["memory", "dynamodb"])
def make_store(request: pytest.FixtureRequest) -> Callable[[Clock], Any]:
    if request.param == "memory":
        return lambda clock: MemoryProgress(clock_ms=clock)
    client = request.getfixturevalue("aws_session").client("dynamodb")
    table = f"progress-{uuid.uuid4().hex[:8]}"
    return lambda clock: DynamoProgress(client, table, "ingest", clock_ms=clock)


def test_versioned_saves_never_go_back(make_store: Callable[[Clock], Any]) -> None:
    store = make_store(Clock())
    assert store.load("c1") is None
    assert store.save("c1", {"n": 1}, 1)
    assert not store.save("c1", {"n": 0}, 1)
    assert store.save("c1", {"n": 3}, 3)
    assert not store.save("c1", {"n": 2}, 2)
    assert store.load("c1") == {"n": 3}


def test_a_claimed_call_is_saved_only_by_its_owner(make_store: Callable[[Clock], Any]) -> None:
    clock = Clock()
    store = make_store(clock)
    first = store.claim("c1", "a", LEASE_MS)
    assert first.granted and first.state is None and not first.unreleased
    assert store.load("c1") is None  # claimed, nothing saved yet
    assert store.save_owned("c1", "a", {"n": 1}, 1)
    assert not store.save_owned("c1", "b", {"n": 2}, 2)  # not the owner
    assert not store.save_owned("c1", "a", {"n": 0}, 1)  # not a higher version
    refused = store.claim("c1", "b", LEASE_MS)
    assert not refused.granted and refused.holder == "a" and refused.state == {"n": 1}
    assert store.load("c1") == {"n": 1}


def test_a_stale_owner_is_replaced_and_reported_unreleased(
    make_store: Callable[[Clock], Any],
) -> None:
    clock = Clock()
    store = make_store(clock)
    assert store.claim("c1", "a", LEASE_MS).granted
    assert store.save_owned("c1", "a", {"n": 1}, 5)
    saved_at = clock.now
    clock.now += LEASE_MS // 2
    assert store.heartbeat("c1", "a")
    clock.now += LEASE_MS - 1
    assert not store.claim("c1", "b", LEASE_MS).granted  # the heartbeat kept it
    clock.now += 2
    taken = store.claim("c1", "b", LEASE_MS)
    assert taken.granted and taken.unreleased and taken.version == 5
    assert taken.state == {"n": 1} and taken.saved_at_ms == saved_at
    assert not store.heartbeat("c1", "a")  # a notices it lost the call
    assert not store.save_owned("c1", "a", {"n": 9}, 9)
    assert not store.release("c1", "a")
    assert store.save_owned("c1", "b", {"n": 2}, 6)


def test_a_released_call_is_taken_at_once_and_reported_released(
    make_store: Callable[[Clock], Any],
) -> None:
    clock = Clock()
    store = make_store(clock)
    assert store.claim("c1", "a", LEASE_MS).granted
    assert store.save_owned("c1", "a", {"n": 1}, 1)
    assert store.release("c1", "a")
    taken = store.claim("c1", "b", LEASE_MS)
    assert taken.granted and not taken.unreleased and taken.state == {"n": 1}


def test_an_owner_may_claim_its_own_call_again(make_store: Callable[[Clock], Any]) -> None:
    store = make_store(Clock())
    assert store.claim("c1", "a", LEASE_MS).granted
    again = store.claim("c1", "a", LEASE_MS)
    assert again.granted and again.unreleased  # what it did since its last save is unknown
