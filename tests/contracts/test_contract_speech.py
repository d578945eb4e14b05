"""Every speech engine passes the one speech-engine contract (`speech_contract.py`).

Engines: the offline engine (real Moonshine on a 2 s real utterance), the same
behind `PooledEngine`, and Amazon Transcribe per track and stereo (the unchanged
SDK against `LocalTranscribeServer`, backed by `LengthTestEngine`, a test double
that turns audio length into results). A new engine is one more factory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from speech_contract import BYTES_PER_MS, CHECKS, SpeechAdapter

from callstream.asr.port import Hypothesis, RecognitionStream, SpeechEngine

SEGMENT_MS = 500


class LengthTestEngine:
    """TEST DOUBLE behind the local endpoint, not a recogniser: per 500 ms of audio
    that is not silent, a partial at its half and a final at its end ("segment K");
    `close()` finalises a non-silent incomplete last segment; English only."""

    name = "length-test-double"

    def open_stream(self, *, contact_id: str, track: str, language: str) -> _LengthStream:
        if not language.startswith("en-"):
            raise ValueError(f"language {language} is not supported by the test double")
        return _LengthStream()


class _LengthStream:
    def __init__(self) -> None:
        self._audio = bytearray()
        self._index = 0
        self._half_done = False
        self._ready: list[Hypothesis] = []

    def send(self, pcm: bytes) -> None:
        self._audio += pcm
        size = SEGMENT_MS * BYTES_PER_MS
        while True:
            start = self._index * size
            if not self._half_done and len(self._audio) >= start + size // 2:
                self._half_done = True
                self._emit(start, start + size // 2, partial=True)
            elif len(self._audio) >= start + size:
                self._emit(start, start + size, partial=False)
                self._index, self._half_done = self._index + 1, False
            else:
                return

    def poll(self) -> list[Hypothesis]:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> list[Hypothesis]:
        start = self._index * SEGMENT_MS * BYTES_PER_MS
        self._emit(start, len(self._audio), partial=False)
        return self.poll()

    def _emit(self, start: int, end: int, *, partial: bool) -> None:
        samples = np.frombuffer(bytes(self._audio[start:end]), dtype="<i2")
        if samples.size == 0 or int(np.abs(samples).max()) <= 100:
            return
        text = "segment" if partial else f"segment {self._index}"
        self._ready.append(
            Hypothesis(
                f"segment-{self._index}",
                start // BYTES_PER_MS,
                end // BYTES_PER_MS,
                text,
                partial,
            )
        )


class EngineAdapter:
    """A `SpeechEngine` opened on one track of a fresh call each time."""

    def __init__(self, name: str, engine: SpeechEngine, patience_s: float) -> None:
        self.name = name
        self.engine = engine
        self.patience_s = patience_s
        self._calls = 0

    def open(self, language: str = "en-US") -> RecognitionStream:
        self._calls += 1
        return self.engine.open_stream(
            contact_id=f"contract-{self._calls}", track="AUDIO_FROM_CUSTOMER", language=language
        )


@pytest.fixture(scope="module")
def offline_engine() -> Any:
    pytest.importorskip("onnxruntime", reason="the offline engine needs the offline extra")
    from callstream.asr.offline.engine import OfflineEngine

    return OfflineEngine()


@pytest.fixture
def transcribe_server() -> Iterator[Any]:
    pytest.importorskip("hypercorn", reason="the local Transcribe endpoint needs hypercorn")
    from callstream_emulator.transcribe import LocalTranscribeServer

    with LocalTranscribeServer(LengthTestEngine()) as running:
        yield running


def _offline(request: pytest.FixtureRequest) -> Iterator[EngineAdapter]:
    yield EngineAdapter("offline", request.getfixturevalue("offline_engine"), 5.0)


def _pooled(request: pytest.FixtureRequest) -> Iterator[EngineAdapter]:
    from callstream.asr.offline.pool import PooledEngine

    pooled = PooledEngine(request.getfixturevalue("offline_engine"), workers=2)
    yield EngineAdapter("pooled offline", pooled, 5.0)
    pooled.close()


def _transcribe(request: pytest.FixtureRequest, stereo: bool) -> Iterator[EngineAdapter]:
    from callstream.asr.transcribe.engine import TranscribeEngine
    from callstream.asr.transcribe.stereo import StereoTranscribeEngine

    server = request.getfixturevalue("transcribe_server")
    request.getfixturevalue("trust_local_transcribe")(server)
    with TranscribeEngine("us-east-1", endpoint_url=server.address.url) as transcribe:
        if stereo:
            yield EngineAdapter("transcribe stereo", StereoTranscribeEngine(transcribe), 5.0)
        else:
            yield EngineAdapter("transcribe per track", transcribe, 5.0)


ADAPTERS: dict[str, Callable[[pytest.FixtureRequest], Iterator[EngineAdapter]]] = {
    "offline": _offline,
    "pooled": _pooled,
    "transcribe-per-track": lambda request: _transcribe(request, stereo=False),
    "transcribe-stereo": lambda request: _transcribe(request, stereo=True),
}


@pytest.fixture(
    params=[
        "offline",
        "pooled",
        pytest.param("transcribe-per-track", marks=pytest.mark.integration),
        pytest.param("transcribe-stereo", marks=pytest.mark.integration),
    ]
)
def adapter(request: pytest.FixtureRequest) -> Iterator[SpeechAdapter]:
    yield from ADAPTERS[request.param](request)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_speech_engine_keeps_the_port_contract(
    adapter: SpeechAdapter, check: Callable[[SpeechAdapter], None]
) -> None:
    check(adapter)
