"""`PooledEngine`: decoding leaves the caller's thread and runs several streams at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from callstream.asr.offline.pool import PooledEngine
from callstream.asr.port import FatalSpeechError, Hypothesis


@dataclass
class GatedStream:
    """TEST DOUBLE: poll() blocks until the test opens the gate, then returns one result."""

    gate: threading.Event
    running: list[str]
    name: str
    sent: list[bytes] = field(default_factory=list)
    fail: bool = False

    def send(self, pcm: bytes) -> None:
        self.sent.append(pcm)

    def poll(self) -> list[Hypothesis]:
        self.running.append(self.name)
        self.gate.wait(10)
        if self.fail:
            raise FatalSpeechError("boom", hypotheses=(Hypothesis("r0", 0, 1, "late", False),))
        return [Hypothesis(f"r{len(self.sent)}", 0, 10, f"{self.name} {len(self.sent)}", True)]

    def close(self) -> list[Hypothesis]:
        return [Hypothesis("end", 0, 10, f"{self.name} final", False)]


class GatedEngine:
    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running: list[str] = []
        self.streams: dict[str, GatedStream] = {}

    def open_stream(self, *, contact_id: str, track: str, language: str) -> GatedStream:
        stream = GatedStream(self.gate, self.running, contact_id)
        self.streams[contact_id] = stream
        return stream


def wait_until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not callable(condition) or not condition():
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.fixture
def gated() -> GatedEngine:
    return GatedEngine()


def test_send_and_poll_return_at_once_while_streams_decode_in_parallel(gated: GatedEngine) -> None:
    engine = PooledEngine(gated, workers=2)
    try:
        a = engine.open_stream(contact_id="a", track="t", language="en-US")
        b = engine.open_stream(contact_id="b", track="t", language="en-US")
        a.send(b"\x00\x00")
        b.send(b"\x00\x00")
        # Decoding is held at the gate, yet the caller gets its answer.
        assert a.poll() == [] and b.poll() == []
        wait_until(lambda: sorted(gated.running) == ["a", "b"])  # both at once
        gated.gate.set()
        wait_until(lambda: bool(a.poll()))
        assert [h.text for h in a.close()][-1] == "a final"
    finally:
        gated.gate.set()
        engine.close()


def test_a_decoding_failure_surfaces_after_the_results_before_it(gated: GatedEngine) -> None:
    engine = PooledEngine(gated, workers=1)
    try:
        stream = engine.open_stream(contact_id="a", track="t", language="en-US")
        gated.streams["a"].fail = True
        gated.gate.set()
        stream.send(b"\x00\x00")
        seen: list[Hypothesis] = []
        deadline = time.monotonic() + 10
        with pytest.raises(FatalSpeechError):
            while time.monotonic() < deadline:
                seen += stream.poll()
                time.sleep(0.005)
        assert [h.text for h in seen] == ["late"]
    finally:
        engine.close()


def test_at_least_one_worker_is_required(gated: GatedEngine) -> None:
    with pytest.raises(ValueError, match="workers"):
        PooledEngine(gated, workers=0)
