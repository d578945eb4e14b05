"""Early finals and overload shedding of the offline engine's streams.

A final decoded during the end hangover is reused only for exactly the same
samples, so finals stay the same however the audio is polled; a poll that is
behind real time decodes finals only. The model is loaded once (~4 s).
"""

from __future__ import annotations

import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from callstream.asr.offline.endpointer import EndpointerConfig
from callstream.asr.offline.engine import OfflineStream, shared_model
from callstream.asr.offline.moonshine import MoonshineModel, Transcript
from callstream.asr.port import Hypothesis

AGENT = Path(__file__).resolve().parents[2] / "samples" / "call" / "agent.wav"
CHUNK_20MS = 320


class CountingModel:
    """The real model, counting how often each 16 kHz audio length is decoded
    without a draft (as a final is)."""

    def __init__(self, model: MoonshineModel) -> None:
        self.model = model
        self.final_decodes: Counter[int] = Counter()

    def transcribe(self, audio: np.ndarray, draft: tuple[int, ...] = ()) -> Transcript:
        if not draft:
            self.final_decodes[len(audio)] += 1
        return self.model.transcribe(audio, draft=draft)


@pytest.fixture(scope="module")
def model() -> MoonshineModel:
    return shared_model()


def agent_pcm(seconds: float) -> bytes:
    with wave.open(str(AGENT)) as w:
        return w.readframes(int(seconds * w.getframerate()))


def stream(model: object, partials: bool) -> OfflineStream:
    return OfflineStream(model, "call-1", "AUDIO_TO_CUSTOMER", partials, EndpointerConfig())  # type: ignore[arg-type]


def fed_in_20ms(s: OfflineStream, pcm: bytes) -> list[Hypothesis]:
    out: list[Hypothesis] = []
    for at in range(0, len(pcm), CHUNK_20MS):
        s.send(pcm[at : at + CHUNK_20MS])
        out += s.poll()
    return out + s.close()


def finals(hypotheses: list[Hypothesis]) -> list[Hypothesis]:
    return [h for h in hypotheses if not h.is_partial]


def test_finals_polled_often_reuse_the_early_decode_and_equal_a_single_late_decode(
    model: MoonshineModel,
) -> None:
    pcm = agent_pcm(12.0)
    counting = CountingModel(model)
    polled = fed_in_20ms(stream(counting, partials=False), pcm)
    whole = stream(model, partials=False)
    whole.send(pcm)
    assert finals(polled) == whole.close()
    assert len(finals(polled)) >= 2
    # Each final's samples were decoded once, during the hangover, not again at close.
    assert counting.final_decodes and max(counting.final_decodes.values()) == 1


def test_speech_resuming_after_the_early_decode_gets_a_fresh_final(
    model: MoonshineModel,
) -> None:
    pcm = np.frombuffer(agent_pcm(4.5), "<i2")
    # A 350 ms pause inside the first phrase: the VAD hears about 250 ms of it,
    # more than the postroll (so an early final is decoded) and less than the
    # end hangover (so the utterance goes on).
    cut, pause = 2 * 8000, 2800
    paused = np.concatenate([pcm[:cut], np.zeros(pause, np.int16), pcm[cut:]]).tobytes()
    counting = CountingModel(model)
    polled = fed_in_20ms(stream(counting, partials=True), paused)
    whole = stream(model, partials=False)
    whole.send(paused)
    expected = whole.close()
    assert finals(polled) == expected
    assert len(expected) == 1 and "worst" in expected[0].text.lower()
    config = EndpointerConfig()
    audio_start = expected[0].start_ms * 8 - config.samples(config.preroll_ms)
    decoded_ends = [audio_start + n // 2 for n in counting.final_decodes]
    assert any(cut <= end <= cut + pause for end in decoded_ends), "no early decode in the pause"


def test_a_poll_behind_real_time_decodes_finals_but_no_partials(model: MoonshineModel) -> None:
    pcm = agent_pcm(12.0)
    s = stream(model, partials=True)
    s.send(pcm)
    caught_up = s.poll()
    assert caught_up and all(not h.is_partial for h in caught_up)
    assert fed_in_20ms(s, agent_pcm(0.0)) == []  # close() after catching up adds nothing
