"""Fault-at-every-step harness: fail the k-th effect of a run, one way at a time.

A handler's effects (publish, save, put, upload, checkpoint) go through
`Faults.effect`, which numbers them in the order they happen. A run with no
fault gives the effect count N and the reference output; then, for every k
below N and every `MODES` entry, the same run again with effect k failing:

- `raise-before`: the effect does not happen and raises `StoreUnavailable`
  (a throttled PutRecords past its deadline, a DynamoDB 5xx);
- `raise-after`: the effect happens, then raises (the response was lost);
- `crash-before` / `crash-after`: the process dies there (`Crash`, a
  BaseException no handler catches), and a new instance starts from what is
  durable: the streams, the stores and the last checkpoint.

The generalisation of the ingest takeover tests' kill points to every handler
and every effect. Only one fault fires per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from callstream.bus.ports import Record
from callstream.errors import StoreUnavailable
from callstream.events import Event

T = TypeVar("T")
MODES = ("raise-before", "raise-after", "crash-before", "crash-after")
RAISE_KINDS = frozenset({"publish", "save", "put", "upload"})
CRASH_KINDS = RAISE_KINDS | {"checkpoint"}


class Crash(BaseException):
    """A kill at an effect: nothing of this instance runs after it."""


@dataclass
class Faults:
    """Numbers effects of the kinds counted, and fails number `fail_at` one way."""

    fail_at: int | None = None
    mode: str = "raise-before"
    seen: list[str] = field(default_factory=list)
    fired: bool = False

    @property
    def kinds(self) -> frozenset[str]:
        """A checkpoint is only ever a kill point: a failed one is not retried by the loop."""
        return CRASH_KINDS if self.mode.startswith("crash") else RAISE_KINDS

    def effect(self, kind: str, apply: Callable[[], T]) -> T:
        """Run one effect, failing it if it is number `fail_at`."""
        hit = False
        if kind in self.kinds:
            hit = len(self.seen) == self.fail_at and not self.fired
            self.seen.append(kind)
        if hit and self.mode.endswith("before"):
            self._fail(kind)
        try:
            result = apply()
        except Exception:
            if hit:  # the effect failed on its own (a partly stored publish): the fault
                self._fail(kind)  # after it still fires, in its place
            raise
        if hit:
            self._fail(kind)
        return result

    def _fail(self, kind: str) -> None:
        self.fired = True
        what = f"injected {self.mode} at effect {self.fail_at} ({kind})"
        if self.mode.startswith("raise"):
            raise StoreUnavailable(what)
        raise Crash(what)


class FaultySink:
    """An EventSink/RawSink whose publishes are effects."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self.inner = inner
        self.stream = inner.stream
        self.faults = faults

    def publish(self, events: Sequence[Event]) -> None:
        self.faults.effect("publish", lambda: self.inner.publish(events))

    def put_raw(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.faults.effect("publish", lambda: self.inner.put_raw(items))


class FaultyProgress:
    """A progress store whose saves are effects (loads are reads)."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    def load(self, contact_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.inner.load(contact_id)
        return result

    def save(self, contact_id: str, state: dict[str, Any], version: int) -> bool:
        return self.faults.effect("save", lambda: self.inner.save(contact_id, state, version))


class FaultySource:
    """A RecordSource whose checkpoints are effects (kill points)."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self.inner = inner
        self.stream = inner.stream
        self.faults = faults

    def poll(self) -> list[Record]:
        records: list[Record] = self.inner.poll()
        return records

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        self.faults.effect(
            "checkpoint",
            lambda: self.inner.checkpoint(shard_id, sequence_number, inclusive=inclusive),
        )

    def close(self) -> None:
        self.inner.close()


def retried(action: Callable[[], T], attempts: int = 20) -> T:
    """What the loop does with a RetryableError from tick or flush: try again."""
    for _ in range(attempts - 1):
        try:
            return action()
        except StoreUnavailable:
            continue
    return action()


def until_done(run: Callable[[], T], restarts: int = 10) -> tuple[T, int]:
    """Run an instance; after a Crash, a new one from what is durable. (result, crashes)"""
    for crashes in range(restarts):
        try:
            return run(), crashes
        except Crash:
            continue
    raise AssertionError(f"still crashing after {restarts} restarts")
