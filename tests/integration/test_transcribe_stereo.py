"""`StereoTranscribeEngine` (the unchanged amazon-transcribe client) against the local endpoint.

Both tracks of a call share one 2-channel stream with channel identification.
The endpoint is backed by `SegmentingTestEngine` (a test double: one final per
500 ms of non-silent audio), so every expected result and time is exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("hypercorn", reason="the local Transcribe endpoint needs hypercorn")

from test_transcribe_engine import (
    BYTES_PER_MS,
    SegmentingTestEngine,
    chunks,
    poll_until_error,
    tone,
)

from callstream.asr.port import Hypothesis, RetryableSpeechError
from callstream.asr.transcribe.engine import TranscribeEngine
from callstream.asr.transcribe.stereo import StereoHandle, StereoTranscribeEngine
from callstream_emulator.transcribe import Fault, LocalTranscribeServer

pytestmark = pytest.mark.integration

CUSTOMER, AGENT = "AUDIO_FROM_CUSTOMER", "AUDIO_TO_CUSTOMER"


def silence(ms: int) -> bytes:
    return bytes(ms * BYTES_PER_MS)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LocalTranscribeServer]:
    options = getattr(request, "param", {})
    with LocalTranscribeServer(SegmentingTestEngine(), **options) as running:
        yield running


@pytest.fixture
def transcribe(
    server: LocalTranscribeServer, trust_local_transcribe: Any
) -> Iterator[TranscribeEngine]:
    trust_local_transcribe(server)
    with TranscribeEngine("us-east-1", endpoint_url=server.address.url) as running:
        yield running


@pytest.fixture
def engine(transcribe: TranscribeEngine) -> StereoTranscribeEngine:
    return StereoTranscribeEngine(transcribe, rejoin_wait_s=5.0)


def open_track(engine: StereoTranscribeEngine, track: str, contact: str = "c-1") -> StereoHandle:
    return engine.open_stream(contact_id=contact, track=track, language="en-US")


def play(*pairs: tuple[StereoHandle, bytes], pause_s: float = 0.01) -> None:
    """Send the tracks' audio side by side in 100 ms chunks, `pause_s` between turns."""
    split = [chunks(pcm) for _, pcm in pairs]
    for turn in range(max(len(parts) for parts in split)):
        for (handle, _), parts in zip(pairs, split, strict=True):
            if turn < len(parts):
                handle.send(parts[turn])
        time.sleep(pause_s)


def poll_until(
    handle: StereoHandle, condition: Callable[[list[Hypothesis]], bool], timeout_s: float = 5.0
) -> list[Hypothesis]:
    seen: list[Hypothesis] = []
    deadline = time.monotonic() + timeout_s
    while not condition(seen):
        assert time.monotonic() < deadline, f"condition not met; got {seen}"
        seen.extend(handle.poll())
        time.sleep(0.01)
    return seen


def finals(hypotheses: list[Hypothesis]) -> list[tuple[int, int]]:
    return [(h.start_ms, h.end_ms) for h in hypotheses if not h.is_partial]


def has_finals(count: int) -> Callable[[list[Hypothesis]], bool]:
    return lambda seen: len(finals(seen)) >= count


# --- channel identification at the endpoint ------------------------------------------


def test_the_endpoint_splits_a_two_channel_stream_and_tags_each_result_with_its_channel(
    transcribe: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    stream = transcribe.open_stream(contact_id="c", track="stereo", language="en-US", channels=2)
    left, right = tone(1000), silence(500) + tone(500)
    frames = bytearray()
    for a, b in zip(chunks(left, 1), chunks(right, 1), strict=True):  # 1 ms of each
        for i in range(0, len(a), 2):
            frames += a[i : i + 2] + b[i : i + 2]
    stream.send(bytes(frames))
    stream.end_audio()
    stream.wait_finished()

    tagged = [(c, h.result_id, h.end_ms) for c, h in stream.take_results() if not h.is_partial]
    assert stream.failure is None
    assert sorted(tagged) == [
        (0, "ch_0-segment-0", 500),
        (0, "ch_0-segment-1", 1000),
        (1, "ch_1-segment-1", 1000),
    ]
    assert stream.sent_ms == 1000
    (record,) = server.streams
    assert record.channels == 2 and record.audio_bytes == 2 * 1000 * BYTES_PER_MS


# --- one stream, two tracks ---------------------------------------------------------


def test_both_tracks_share_one_stream_and_each_hears_only_its_own_channel(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    play((customer, tone(1000)), (agent, silence(500) + tone(1000)))

    heard_customer = customer.poll() + customer.close()
    heard_agent = agent.poll() + agent.close()  # results after the end come with close()

    assert finals(heard_customer) == [(0, 500), (500, 1000)]
    assert finals(heard_agent) == [(500, 1000), (1000, 1500)]
    assert {h.result_id for h in heard_agent}.isdisjoint(h.result_id for h in heard_customer)
    (record,) = server.streams
    assert record.channels == 2 and record.ended_by_client
    assert record.audio_bytes == 2 * 1500 * BYTES_PER_MS  # the customer padded to the end


def test_a_track_that_starts_late_keeps_its_own_times(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    customer = open_track(engine, CUSTOMER)
    play((customer, tone(1500)))
    agent = open_track(engine, AGENT)  # joins 1.5 s into the stream
    play((customer, tone(1000)), (agent, tone(1000)))

    heard_customer = customer.poll() + customer.close()
    heard_agent = agent.poll() + agent.close()

    assert finals(heard_customer) == [(k * 500, (k + 1) * 500) for k in range(5)]
    assert finals(heard_agent) == [(0, 500), (500, 1000)]
    assert len(server.streams) == 1


def test_a_track_much_longer_than_the_other_is_not_held_back_by_it(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    """The customer stops sending after 0.5 s without closing; the agent's audio
    waits at most 1 s for it, then the customer's channel is padded."""
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    play((customer, tone(500)), (agent, tone(3000)))

    early_agent = poll_until(agent, has_finals(4))  # before any close
    heard_customer = customer.poll() + customer.close()
    heard_agent = early_agent + agent.poll() + agent.close()

    assert finals(heard_customer) == [(0, 500)]
    assert finals(heard_agent) == [(k * 500, (k + 1) * 500) for k in range(6)]
    assert server.streams[0].audio_bytes == 2 * 3000 * BYTES_PER_MS


def test_a_call_with_one_silent_track_never_waits_for_it(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    customer = open_track(engine, CUSTOMER)  # the agent track carries no audio at all
    play((customer, tone(1000)))

    early = poll_until(customer, has_finals(2))

    assert finals(early + customer.close()) == [(0, 500), (500, 1000)]
    (record,) = server.streams
    assert record.channels == 2 and record.audio_bytes == 2 * 1000 * BYTES_PER_MS


@pytest.mark.parametrize("server", [{"idle_timeout_s": 1.0}], indirect=True)
def test_keep_alive_silence_on_one_track_reaches_the_service_while_the_other_is_idle(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    play((customer, tone(500)), (agent, tone(500)))
    heard_customer, heard_agent = customer.poll(), agent.poll()
    for _ in range(5):  # 2.5 s without audio, past the endpoint's 1 s idle timeout
        time.sleep(0.5)
        customer.send(silence(1000))  # as the core's keep-alive does, one track only
        heard_customer += customer.poll()
        heard_agent += agent.poll()
    play((customer, tone(500)), (agent, tone(500)))

    heard_customer += customer.poll() + customer.close()
    heard_agent += agent.poll() + agent.close()

    assert finals(heard_customer) == [(0, 500), (5500, 6000)]
    assert finals(heard_agent) == [(0, 500), (500, 1000)]  # padding maps to no agent time
    assert len(server.streams) == 1


# --- failures, reopening and closing ---------------------------------------------------


def test_a_failure_fails_both_tracks_and_their_reopened_streams_share_one_new_stream(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    server.inject(Fault.fail("LimitExceededException", after_audio_events=6))
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    # Paced so each 100 ms of frames is one AudioEvent: the fault strikes at 600 ms.
    play((customer, tone(1200)), (agent, tone(1200)), pause_s=0.05)

    seen_customer, customer_error = poll_until_error(customer)
    seen_agent, agent_error = poll_until_error(agent)

    assert finals(seen_customer) == finals(seen_agent) == [(0, 500)]
    for error in (customer_error, agent_error):
        assert isinstance(error, RetryableSpeechError)
        assert error.code == "LimitExceededException"
    # The core resends each track's audio since its last final, after its own backoff.
    customer = open_track(engine, CUSTOMER)
    customer.send(tone(1000))
    time.sleep(0.3)
    assert len(server.streams) == 1  # waits for the agent to rejoin
    agent = open_track(engine, AGENT)
    agent.send(tone(500))
    heard_agent = poll_until(agent, has_finals(1))
    heard_customer = customer.poll() + customer.close()
    heard_agent += agent.poll() + agent.close()

    assert finals(heard_customer) == [(0, 500), (500, 1000)]
    assert finals(heard_agent) == [(0, 500)]  # led in by 500 ms of padding, mapped away
    assert len(server.streams) == 2
    assert server.streams[1].audio_bytes == 2 * 1000 * BYTES_PER_MS


def test_a_track_that_does_not_rejoin_in_time_is_not_waited_for_again(
    transcribe: TranscribeEngine, server: LocalTranscribeServer
) -> None:
    engine = StereoTranscribeEngine(transcribe, rejoin_wait_s=0.3)
    server.inject(Fault.fail("ServiceUnavailableException", after_audio_events=2))
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    play((customer, tone(300)), (agent, tone(300)))
    poll_until_error(customer)
    poll_until_error(agent)  # the agent track gives up, say

    customer = open_track(engine, CUSTOMER)
    customer.send(tone(500))
    heard = poll_until(customer, has_finals(1))  # after the 0.3 s wait

    assert finals(heard + customer.close()) == [(0, 500)]
    assert len(server.streams) == 2


def test_closing_one_track_ends_the_stream_and_the_other_resends_if_it_goes_on(
    engine: StereoTranscribeEngine, server: LocalTranscribeServer
) -> None:
    """A rollover of one track: the other, still live, must move to a new stream.
    Its results that came after the end (a cut utterance) are not handed out."""
    customer, agent = open_track(engine, CUSTOMER), open_track(engine, AGENT)
    play((customer, tone(1000)), (agent, tone(750)))
    before_end = poll_until(agent, has_finals(1))

    assert finals(customer.close()) == [(0, 500), (500, 1000)]
    before_end += agent.poll()  # no error yet: the agent may be closing too
    agent.send(tone(100))  # ...but it goes on
    _, error = poll_until_error(agent)

    assert isinstance(error, RetryableSpeechError) and error.code == "StereoStreamEnded"
    assert error.hypotheses == ()
    assert finals(before_end) == [(0, 500)]  # (500, 750) came after the end: dropped
    assert server.streams[0].ended_by_client


def test_an_unknown_track_is_refused() -> None:
    engine = StereoTranscribeEngine(TranscribeEngine("us-east-1"))
    try:
        with pytest.raises(ValueError, match="AUDIO_FROM_CUSTOMER"):
            open_track(engine, "MIXED")
    finally:
        engine.close()
