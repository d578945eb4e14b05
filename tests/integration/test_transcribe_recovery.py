"""The transcriber handler over Amazon Transcribe, with faults injected mid-call.

The path is the production one from the handler down: `TranscriberHandler` ->
`CallTranscription` -> `TranscribeEngine` (the unchanged amazon-transcribe SDK)
-> HTTP/2+TLS -> the local Transcribe endpoint, here backed by the real offline
engine (Moonshine), so the words are real. Each retryable failure is injected
mid-call; every word must still come out once. The agent track of the sample
call is fed faster than real time. About 20 s in all on one core.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import wave
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jiwer
import pytest

pytest.importorskip("hypercorn", reason="the local Transcribe endpoint needs hypercorn")

from callstream.asr.offline.engine import OfflineEngine
from callstream.asr.transcribe.engine import TranscribeEngine
from callstream.bus.ports import Record
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    Track,
    TranscriptSegmentProduced,
)
from callstream_emulator.transcribe import Fault, LocalTranscribeServer
from services.transcriber.handler import TranscriberHandler
from services.transcriber.recovery import RecoveryPolicy

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "call"
TRACK = Track.TO_CUSTOMER
CHUNK_BYTES = 2048  # 128 ms, as ingest sends
RECORD = Record("audio", "shard-0", "1", "c", b"")
IDLE_TIMEOUT_S = 4.0  # the endpoint's (15 s in the service); keep-alive after 0.5 s
POLICY = RecoveryPolicy(backoff_base_s=0.05, backoff_max_s=0.2, keepalive_after_s=0.5)
WER_BOUND = 0.10
# Played before any fault: its audio goes out in at most 94 AudioEvents (128 ms or
# more each), so a fault after 100 events or more strikes after it.
FIRST_PART_MS = 12_000  # the offline engine measured 0.00-0.03 on this track


class ListSink:
    """Collects what the handler publishes."""

    stream = "transcripts"

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, events: Sequence[Event]) -> None:
        self.events.extend(events)


def normalise(text: str) -> str:
    """Lowercase, hyphens to spaces, punctuation dropped, whitespace collapsed."""
    text = re.sub(r"[^\w\s']|'(?!\w)", " ", text.lower().replace("-", " "))
    return " ".join(text.split())


def agent_pcm() -> bytes:
    with wave.open(str(SAMPLES / "agent.wav")) as w:
        return w.readframes(w.getnframes())


def reference_text() -> str:
    rows = json.loads((SAMPLES / "reference.json").read_text())
    return normalise(" ".join(r["text"] for r in rows if r["track"] == TRACK.value))


@pytest.fixture(scope="module")
def server() -> Iterator[LocalTranscribeServer]:
    with LocalTranscribeServer(
        OfflineEngine(partials=False), idle_timeout_s=IDLE_TIMEOUT_S
    ) as running:
        yield running


@pytest.fixture
def engine(
    server: LocalTranscribeServer, trust_local_transcribe: Any
) -> Iterator[TranscribeEngine]:
    trust_local_transcribe(server)
    with TranscribeEngine("us-east-1", endpoint_url=server.address.url) as running:
        yield running


class Call:
    """Plays one track into the handler: chunks in order, with the handler ticking."""

    def __init__(self, handler: TranscriberHandler, contact_id: str) -> None:
        self.handler = handler
        self.contact_id = contact_id
        self.sequence = 0
        handler.handle(CallStarted(contact_id, "arn", 0, language_code="en-US"), RECORD)

    def play(self, pcm: bytes, chunks_per_tick: int = 8, tick_s: float = 0.02) -> None:
        """Faster than real time, ticking the handler between every second of audio."""
        for at in range(0, len(pcm), CHUNK_BYTES):
            offset = self.sequence * CHUNK_BYTES // 2
            chunk = AudioChunkCaptured(
                self.contact_id,
                TRACK,
                self.sequence,
                offset,
                offset // 8,
                offset // 8,
                pcm[at : at + CHUNK_BYTES],
                "1",
            )
            self.handler.handle(chunk, RECORD)
            self.sequence += 1
            if self.sequence % chunks_per_tick == 0:
                self.idle(tick_s)

    def idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.handler.tick()
            time.sleep(0.02)

    def wait_for_final(self, sink: ListSink, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not finals(sink.events):
            assert time.monotonic() < deadline, "no final came back"
            self.idle(0.02)

    def end(self, timeout_s: float = 60.0) -> None:
        counts = {TRACK.value: self.sequence}
        ended = CallEnded(self.contact_id, EndReason.END_OF_STREAM, 0, chunk_counts=counts)
        self.handler.handle(ended, RECORD)
        deadline = time.monotonic() + timeout_s
        while not self.handler.is_settled(self.contact_id):
            assert time.monotonic() < deadline, "the call did not finish"
            self.handler.tick()
            time.sleep(0.02)


def finals(events: list[Event]) -> list[TranscriptSegmentProduced]:
    return [e for e in events if isinstance(e, TranscriptSegmentProduced) and not e.is_partial]


def check_each_word_once(events: list[Event]) -> None:
    done = finals(events)
    assert len({s.segment_id for s in done}) == len(done), "a final was emitted twice"
    for earlier, later in itertools.pairwise(done):
        assert earlier.end_ms <= later.start_ms, f"finals overlap: {earlier} / {later}"
    heard = normalise(" ".join(s.transcript for s in done))
    measures = jiwer.process_words(reference_text(), heard)
    assert measures.wer <= WER_BOUND, f"WER {measures.wer:.3f}: {heard!r}"
    assert measures.insertions == 0, f"words heard twice? {heard!r}"


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(
            Fault.fail("LimitExceededException", after_audio_events=60), id="limit-exceeded"
        ),
        pytest.param(
            Fault.fail("ServiceUnavailableException", after_audio_events=90), id="unavailable"
        ),
        pytest.param(Fault.fail("InternalFailureException", after_audio_events=120), id="internal"),
        pytest.param(Fault.drop(after_audio_events=75), id="connection-dropped"),
    ],
)
def test_each_retryable_fault_mid_call_loses_no_word_and_repeats_none(
    server: LocalTranscribeServer, engine: TranscribeEngine, fault: Fault
) -> None:
    before = len(server.streams)
    server.inject(fault)
    sink = ListSink()
    call = Call(TranscriberHandler(engine, sink, "en-US", POLICY), f"fault-{fault.exception}")
    pcm, first = agent_pcm(), FIRST_PART_MS * 16
    call.play(pcm[:first])
    call.wait_for_final(sink)  # so the failure comes after a final, whatever the load
    call.play(pcm[first:])
    call.end()
    check_each_word_once(sink.events)
    streams = server.streams[before:]
    assert len(streams) >= 2 and streams[0].fault == fault
    # The new stream heard the audio since the last final, not the whole call again.
    assert streams[1].audio_bytes < len(agent_pcm()) - 16_000
    assert isinstance(sink.events[-1], CallEnded)


def test_a_silent_stretch_and_a_pause_in_the_audio_keep_one_stream_and_lose_nothing(
    server: LocalTranscribeServer, engine: TranscribeEngine
) -> None:
    """30 s of silent audio, and within it a pause (no chunks) past the endpoint's
    idle timeout (4 s here, 15 s in the service): keep-alive silence holds the
    stream open, the speech after the silence is transcribed."""
    pcm = agent_pcm()
    cut = 20_000 * 16  # 20 s: between two agent turns
    before = len(server.streams)
    sink = ListSink()
    call = Call(TranscriberHandler(engine, sink, "en-US", POLICY), "silence-1")
    call.play(pcm[:cut] + bytes(15_000 * 16))
    call.idle(IDLE_TIMEOUT_S + 1.0)  # no audio arrives for longer than the idle timeout
    call.play(bytes(15_000 * 16) + pcm[cut:])
    call.end()
    check_each_word_once(sink.events)
    assert len(server.streams) - before == 1  # never timed out
    late = [s for s in finals(sink.events) if s.start_ms >= cut // 16]
    assert late and all(s.start_ms >= cut // 16 + 30_000 for s in late)
