"""`TranscribeEngine` (the unchanged amazon-transcribe client) against the local endpoint.

The endpoint is backed by `SegmentingTestEngine`, a deterministic test double
defined here: it recognises nothing, it only turns audio length into results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

pytest.importorskip("hypercorn", reason="the local Transcribe endpoint needs hypercorn")

from callstream.asr.port import (
    FatalSpeechError,
    Hypothesis,
    RecognitionStream,
    RetryableSpeechError,
    SpeechEngineError,
    Word,
)
from callstream.asr.transcribe.engine import TranscribeEngine, TranscribeStream
from callstream.audio import BYTES_PER_MS, SAMPLE_RATE
from callstream.errors import RetryableError
from callstream_emulator.transcribe import Fault, LocalTranscribeServer

pytestmark = pytest.mark.integration

SEGMENT_MS = 500
CHUNK_MS = 100


# --- the test double behind the endpoint -------------------------------------------


class SegmentingTestEngine:
    """TEST DOUBLE, not a recogniser: results are derived from audio length only.

    Per `segment_ms` of audio that is not silent it emits a partial ("segment")
    once half the segment has arrived and a final ("segment K.") once all of it
    has; `close()` turns a non-silent incomplete last segment into a final.
    Result ids are "segment-K"; languages other than English are refused.
    """

    name = "segmenting-test-double"

    def __init__(self, segment_ms: int = SEGMENT_MS) -> None:
        self.segment_ms = segment_ms

    def open_stream(self, *, contact_id: str, track: str, language: str) -> _SegmentingStream:
        if not language.startswith("en-"):
            raise ValueError(f"language {language} is not supported by the test double")
        return _SegmentingStream(self.segment_ms * BYTES_PER_MS)


class _SegmentingStream:
    def __init__(self, segment_bytes: int) -> None:
        self._segment = segment_bytes
        self._audio = bytearray()
        self._index = 0
        self._partial_sent = False
        self._ready: list[Hypothesis] = []

    def send(self, pcm: bytes) -> None:
        self._audio += pcm
        self._advance()

    def poll(self) -> list[Hypothesis]:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> list[Hypothesis]:
        start = self._index * self._segment
        if self._loud(start, len(self._audio)):
            self._ready.append(self._result(start, len(self._audio), partial=False))
        return self.poll()

    def _advance(self) -> None:
        while True:
            start = self._index * self._segment
            half, end = start + self._segment // 2, start + self._segment
            if not self._partial_sent and len(self._audio) >= half:
                self._partial_sent = True
                if self._loud(start, half):
                    self._ready.append(self._result(start, half, partial=True))
            elif len(self._audio) >= end:
                if self._loud(start, end):
                    self._ready.append(self._result(start, end, partial=False))
                self._index += 1
                self._partial_sent = False
            else:
                return

    def _loud(self, start: int, end: int) -> bool:
        samples = np.frombuffer(bytes(self._audio[start:end]), dtype="<i2")
        return samples.size > 0 and int(np.abs(samples).max()) > 100

    def _result(self, start: int, end: int, *, partial: bool) -> Hypothesis:
        start_ms, end_ms = start // BYTES_PER_MS, end // BYTES_PER_MS
        words: tuple[Word, ...]
        if partial:
            words = (Word("segment", start_ms, end_ms),)
            text = "segment"
        else:
            mid = (start_ms + end_ms) // 2
            number = str(self._index)
            words = (
                Word("segment", start_ms, mid, 0.9),
                Word(number, mid, end_ms, 0.8),
                Word(".", end_ms, end_ms),  # served as a punctuation item
            )
            text = f"segment {number}."
        return Hypothesis(f"segment-{self._index}", start_ms, end_ms, text, partial, words)


# --- helpers and fixtures -------------------------------------------------------------


def tone(ms: int) -> bytes:
    t = np.arange(ms * SAMPLE_RATE // 1000) / SAMPLE_RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


def chunks(pcm: bytes, ms: int = CHUNK_MS) -> list[bytes]:
    size = ms * BYTES_PER_MS
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def send_paced(stream: TranscribeStream, pcm: bytes) -> None:
    """One AudioEvent per chunk: wait until each chunk is out before sending the next."""
    for chunk in chunks(pcm):
        target = stream.sent_ms + len(chunk) // BYTES_PER_MS
        stream.send(chunk)
        wait_for(lambda: stream.sent_ms >= target)  # noqa: B023 (called before the next turn)


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def poll_until_finals(stream: TranscribeStream, count: int) -> list[Hypothesis]:
    seen: list[Hypothesis] = []
    deadline = time.monotonic() + 5.0
    while len(_finals(seen)) < count:
        assert time.monotonic() < deadline, f"expected {count} finals, got {seen}"
        seen.extend(stream.poll())
        time.sleep(0.01)
    return seen


def poll_until_error(stream: RecognitionStream) -> tuple[list[Hypothesis], SpeechEngineError]:
    """Poll (any recognition stream, stereo handles too) until it raises; what came first."""
    seen: list[Hypothesis] = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            seen.extend(stream.poll())
        except SpeechEngineError as error:
            return seen, error
        time.sleep(0.01)
    raise AssertionError(f"poll() never raised; got {seen}")


def _finals(hypotheses: list[Hypothesis]) -> list[Hypothesis]:
    return [h for h in hypotheses if not h.is_partial]


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LocalTranscribeServer]:
    options = getattr(request, "param", {})
    with LocalTranscribeServer(SegmentingTestEngine(), **options) as running:
        yield running


@pytest.fixture
def aws_env(server: LocalTranscribeServer, trust_local_transcribe: Any) -> None:
    trust_local_transcribe(server)


@pytest.fixture
def make_engine(
    server: LocalTranscribeServer, aws_env: None
) -> Iterator[Callable[..., TranscribeEngine]]:
    engines: list[TranscribeEngine] = []

    def make(**options: Any) -> TranscribeEngine:
        engine = TranscribeEngine("us-east-1", endpoint_url=server.address.url, **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., TranscribeEngine]) -> TranscribeEngine:
    return make_engine()


def open_stream(engine: TranscribeEngine, language: str = "en-US") -> TranscribeStream:
    return engine.open_stream(
        contact_id="contact-1", track="AUDIO_FROM_CUSTOMER", language=language
    )


# --- results ------------------------------------------------------------------------


def test_partials_then_final_share_result_id_with_times_and_words_mapped(
    engine: TranscribeEngine,
) -> None:
    stream = open_stream(engine)
    send_paced(stream, tone(1000))

    seen = poll_until_finals(stream, 2) + stream.close()

    # Finals keep their "." in the text; the punctuation item is not a word.
    assert seen == [
        Hypothesis("segment-0", 0, 250, "segment", True, (Word("segment", 0, 250),)),
        Hypothesis(
            "segment-0",
            0,
            500,
            "segment 0.",
            False,
            (Word("segment", 0, 250, 0.9), Word("0", 250, 500, 0.8)),
        ),
        Hypothesis("segment-1", 500, 750, "segment", True, (Word("segment", 500, 750),)),
        Hypothesis(
            "segment-1",
            500,
            1000,
            "segment 1.",
            False,
            (Word("segment", 500, 750, 0.9), Word("1", 750, 1000, 0.8)),
        ),
    ]
    assert stream.session_id is not None


def test_close_flushes_every_result_and_ends_the_audio(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    stream = open_stream(engine)
    stream.send(tone(1200))

    seen = stream.close()

    assert [(h.result_id, h.is_partial, h.end_ms) for h in seen] == [
        ("segment-0", True, 250),
        ("segment-0", False, 500),
        ("segment-1", True, 750),
        ("segment-1", False, 1000),
        ("segment-2", False, 1200),
    ]
    assert stream.sent_ms == 1200
    (record,) = server.streams
    assert record.ended_by_client
    assert record.audio_bytes == 1200 * BYTES_PER_MS
    assert record.session_id == stream.session_id
    assert stream.close() == []


def test_silence_produces_no_results(engine: TranscribeEngine) -> None:
    stream = open_stream(engine)
    stream.send(bytes(800 * BYTES_PER_MS))

    assert stream.close() == []


def test_several_streams_at_once_keep_their_own_results(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    def run(segments: int) -> list[Hypothesis]:
        stream = engine.open_stream(
            contact_id=f"contact-{segments}", track="AUDIO_TO_CUSTOMER", language="en-GB"
        )
        for chunk in chunks(tone(segments * SEGMENT_MS)):
            stream.send(chunk)
            time.sleep(0.005)
        return stream.poll() + stream.close()

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, [1, 2, 3, 4]))

    for segments, seen in zip([1, 2, 3, 4], results, strict=True):
        assert [h.result_id for h in _finals(seen)] == [f"segment-{k}" for k in range(segments)]
        assert [h.end_ms for h in _finals(seen)] == [(k + 1) * SEGMENT_MS for k in range(segments)]
    assert sorted(r.audio_bytes for r in server.streams) == [
        n * SEGMENT_MS * BYTES_PER_MS for n in (1, 2, 3, 4)
    ]
    assert all(r.ended_by_client and r.language_code == "en-GB" for r in server.streams)


# --- failures -----------------------------------------------------------------------


def test_limit_exceeded_mid_stream_raises_retryable_from_poll_after_earlier_results(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("LimitExceededException", after_audio_events=3, message="slow down"))
    stream = open_stream(engine)
    send_paced(stream, tone(300))

    seen, error = poll_until_error(stream)

    assert [(h.result_id, h.is_partial) for h in seen] == [("segment-0", True)]
    assert isinstance(error, RetryableSpeechError)
    assert isinstance(error, RetryableError)
    assert error.code == "LimitExceededException"
    assert "LimitExceededException" in str(error) and "slow down" in str(error)
    assert stream.sent_ms == 300
    with pytest.raises(RetryableSpeechError, match="LimitExceededException"):
        stream.close()


def test_limit_exceeded_surfaces_from_close_with_the_results_not_yet_polled(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("LimitExceededException", after_audio_events=3))
    stream = open_stream(engine)
    send_paced(stream, tone(300))

    with pytest.raises(RetryableSpeechError) as raised:
        stream.close()

    assert [(h.result_id, h.is_partial) for h in raised.value.hypotheses] == [("segment-0", True)]


def test_bad_request_at_start_raises_fatal(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("BadRequestException", message="vocabulary not found"))
    stream = open_stream(engine)
    stream.send(tone(200))

    _, error = poll_until_error(stream)

    assert isinstance(error, FatalSpeechError)
    assert error.code == "BadRequestException"
    assert "vocabulary not found" in str(error)
    with pytest.raises(FatalSpeechError):
        stream.close()


def test_bad_request_mid_stream_raises_fatal_from_close(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("BadRequestException", after_audio_events=2))
    stream = open_stream(engine)
    send_paced(stream, tone(200))

    with pytest.raises(FatalSpeechError, match="BadRequestException"):
        stream.close()


def test_a_language_the_engine_refuses_raises_fatal(engine: TranscribeEngine) -> None:
    stream = open_stream(engine, language="fr-FR")

    with pytest.raises(FatalSpeechError, match="fr-FR"):
        stream.close()


def test_rejected_credentials_raise_fatal(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("UnrecognizedClientException", message="invalid token"))
    stream = open_stream(engine)

    with pytest.raises(FatalSpeechError, match=r"UnrecognizedClientException \(HTTP 403\)"):
        stream.close()


def test_service_unavailable_at_start_raises_retryable(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("ServiceUnavailableException"))
    stream = open_stream(engine)

    with pytest.raises(RetryableSpeechError, match="ServiceUnavailableException"):
        stream.close()


def test_dropped_connection_raises_retryable(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.drop(after_audio_events=2))
    stream = open_stream(engine)
    send_paced(stream, tone(200))

    _, error = poll_until_error(stream)

    assert isinstance(error, RetryableSpeechError)
    assert "connection" in str(error).lower()


def test_connection_dropped_before_any_response_raises_retryable_after_open_timeout(
    make_engine: Callable[..., TranscribeEngine], server: LocalTranscribeServer
) -> None:
    server.inject(Fault.drop())
    stream = open_stream(make_engine(open_timeout_s=1.0))

    with pytest.raises(RetryableSpeechError, match=r"did not accept the stream within 1\.0 s"):
        stream.close()


def test_a_new_stream_works_after_a_dropped_connection(
    engine: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.drop(after_audio_events=1))
    first = open_stream(engine)
    send_paced(first, tone(100))
    poll_until_error(first)

    second = open_stream(engine)
    second.send(tone(500))

    assert [h.result_id for h in _finals(second.close())] == ["segment-0"]


# --- configuration ------------------------------------------------------------------


def test_ssl_cert_file_is_read_when_the_engine_is_created(
    server: LocalTranscribeServer, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSL_CERT_FILE")
    untrusting = TranscribeEngine("us-east-1", endpoint_url=server.address.url, open_timeout_s=1.0)
    monkeypatch.setenv("SSL_CERT_FILE", str(server.address.ca_file))
    try:
        with pytest.raises(RetryableSpeechError, match="did not accept"):
            open_stream(untrusting).close()
    finally:
        untrusting.close()


def test_plain_http_endpoint_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="https://"):
        TranscribeEngine("us-east-1", endpoint_url="http://127.0.0.1:8443")


def test_contradictory_redaction_settings_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="not both"):
        TranscribeEngine(
            "us-east-1", content_redaction_type="PII", content_identification_type="PII"
        )


@pytest.mark.parametrize("server", [{"idle_timeout_s": 0.3}], indirect=True)
def test_no_audio_for_the_idle_timeout_raises_retryable(engine: TranscribeEngine) -> None:
    stream = open_stream(engine)
    send_paced(stream, tone(100))

    _, error = poll_until_error(stream)

    assert isinstance(error, RetryableSpeechError)
    assert error.code == "BadRequestException"
    assert "no new audio was received" in str(error)
