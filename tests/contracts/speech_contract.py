"""The speech-engine port's contract (`SpeechEngine` / `RecognitionStream`), written once.

What the transcriber relies on from every engine: open a stream per track,
`send` PCM, `poll` without blocking, `close` to flush; times in milliseconds
from the stream's first sample; partials of an utterance share the result id of
its final and never follow it; `close` hands over what is left (finals last) and
the stream then refuses audio; failures are `SpeechEngineError`s. Each `check_*`
takes a `SpeechAdapter` and raises AssertionError when the engine breaks it;
`test_contract_speech.py` runs them over every engine.
"""

from __future__ import annotations

import time
import wave
from pathlib import Path
from typing import Protocol

import pytest

from callstream.asr.port import (
    Hypothesis,
    RecognitionStream,
    SpeechEngineError,
)
from callstream.audio import BYTES_PER_MS, SAMPLE_RATE

CHUNK_MS = 100
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "utterances" / "utt02.wav"


class SpeechAdapter(Protocol):
    """One engine behind the port, and how long its results may take."""

    name: str
    patience_s: float  # a final may come this long after its audio was sent

    def open(self, language: str = "en-US") -> RecognitionStream: ...


def speech() -> bytes:
    """2.1 s of real speech (LibriVox through a telephone channel), then 1 s of silence."""
    with wave.open(str(SAMPLE)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (SAMPLE_RATE, 2, 1)
        pcm = w.readframes(w.getnframes())
    return pcm + bytes(1000 * BYTES_PER_MS)


def play(stream: RecognitionStream, pcm: bytes, *, polling: bool) -> list[Hypothesis]:
    """Send in 100 ms chunks (polling between them, or not), then close; all results."""
    seen: list[Hypothesis] = []
    size = CHUNK_MS * BYTES_PER_MS
    for i in range(0, len(pcm), size):
        stream.send(pcm[i : i + size])
        if polling:
            seen += stream.poll()
            time.sleep(0.005)
    return seen + stream.close()


def finals(hypotheses: list[Hypothesis]) -> list[Hypothesis]:
    return [h for h in hypotheses if not h.is_partial]


# --- the checks ---------------------------------------------------------------------


def check_finals_lie_within_the_audio_sent(adapter: SpeechAdapter) -> None:
    pcm = speech()
    seen = play(adapter.open(), pcm, polling=True)
    done = finals(seen)
    assert done, f"{adapter.name}: no final for {len(pcm) // BYTES_PER_MS} ms of speech"
    sent_ms = len(pcm) // BYTES_PER_MS
    for h in seen:
        assert isinstance(h, Hypothesis)
        assert 0 <= h.start_ms <= h.end_ms <= sent_ms, (adapter.name, h)
        assert h.result_id, (adapter.name, h)
    assert all(h.text.strip() for h in done), (adapter.name, done)


def check_partials_precede_their_final_with_its_result_id(adapter: SpeechAdapter) -> None:
    seen = play(adapter.open(), speech(), polling=True)
    finalised: set[str] = set()
    for h in seen:
        assert h.result_id not in finalised, f"{adapter.name}: {h} after its final"
        if not h.is_partial:
            finalised.add(h.result_id)
    partial_ids = {h.result_id for h in seen if h.is_partial}
    assert partial_ids <= finalised, f"{adapter.name}: partials never finalised"


def check_close_returns_the_remaining_finals(adapter: SpeechAdapter) -> None:
    polled = finals(play(adapter.open(), speech(), polling=True))
    stream = adapter.open()
    unpolled = finals(play(stream, speech(), polling=False))  # everything comes from close()
    # Result ids may name the call (each open here is a new one): compare times and text.
    got = [(h.start_ms, h.end_ms, h.text) for h in unpolled]
    assert got == [(h.start_ms, h.end_ms, h.text) for h in polled], (adapter.name, got, polled)


def check_a_poll_returns_at_once(adapter: SpeechAdapter) -> None:
    stream = adapter.open()
    stream.send(speech()[: 500 * BYTES_PER_MS])
    started = time.monotonic()
    stream.poll()
    assert time.monotonic() - started < 1.0, f"{adapter.name}: poll() blocked"
    stream.close()


def check_a_closed_stream_refuses_audio(adapter: SpeechAdapter) -> None:
    stream = adapter.open()
    stream.send(bytes(100 * BYTES_PER_MS))
    stream.close()
    with pytest.raises(RuntimeError, match="close"):
        stream.send(bytes(100 * BYTES_PER_MS))


def check_a_language_the_engine_refuses_fails_as_the_port_says(adapter: SpeechAdapter) -> None:
    """Refused up front (ValueError from open_stream, a configuration fault), or from
    the stream as a SpeechEngineError, never as the library's own exception."""
    try:
        stream = adapter.open(language="fr-FR")
    except ValueError as refused:
        assert "fr-FR" in str(refused)
        return
    stream.send(bytes(200 * BYTES_PER_MS))
    with pytest.raises(SpeechEngineError, match="fr-FR"):
        deadline = time.monotonic() + adapter.patience_s
        while time.monotonic() < deadline:
            stream.poll()
            time.sleep(0.01)
        stream.close()


CHECKS = [
    check_finals_lie_within_the_audio_sent,
    check_partials_precede_their_final_with_its_result_id,
    check_close_returns_the_remaining_finals,
    check_a_poll_returns_at_once,
    check_a_closed_stream_refuses_audio,
    check_a_language_the_engine_refuses_fails_as_the_port_says,
]
