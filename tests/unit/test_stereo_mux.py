"""`StereoMux` and `ChannelClock`: interleaving two tracks and mapping times back. Pure."""

from __future__ import annotations

import numpy as np
import pytest

from callstream.asr.transcribe.mux import ChannelClock, StereoMux

MS = 8  # samples per ms at 8 kHz


def mono(ms: int, value: int) -> bytes:
    return np.full(ms * MS, value, dtype="<i2").tobytes()


def channels(frames: bytes) -> tuple[list[int], list[int]]:
    samples = np.frombuffer(frames, dtype="<i2").reshape(-1, 2)
    return samples[:, 0].tolist(), samples[:, 1].tolist()


def test_frames_wait_until_both_channels_have_them() -> None:
    mux = StereoMux(max_lag_ms=1000)
    mux.attach(0)
    mux.attach(1)
    mux.push(0, mono(100, 1))

    assert mux.take() == b""
    mux.push(1, mono(60, 2))
    left, right = channels(mux.take())

    assert left == [1] * 60 * MS and right == [2] * 60 * MS
    assert mux.queued(0) == 40 * MS and mux.queued(1) == 0


def test_a_lagging_channel_is_padded_once_the_other_is_max_lag_ahead() -> None:
    mux = StereoMux(max_lag_ms=1000)
    clock = mux.attach(0)
    mux.attach(1)
    mux.push(1, mono(999, 2))
    assert mux.take() == b""  # under the bound: the agent's audio waits

    mux.push(1, mono(1, 2))
    left, right = channels(mux.take())
    mux.push(0, mono(100, 1))  # the customer's audio arrives late, after the padding
    mux.push(1, mono(100, 2))
    later_left, _ = channels(mux.take())

    assert left == [0] * 1000 * MS and right == [2] * 1000 * MS
    assert later_left == [1] * 100 * MS
    assert mux.padded_samples == [1000 * MS, 0]
    # The customer's own time: padding maps to where it was inserted (0 ms).
    assert clock.span(1000, 1100) == (0, 100)
    assert clock.span(200, 900) is None  # only padding


def test_vacant_and_finished_channels_never_hold_the_other_back() -> None:
    mux = StereoMux()
    mux.attach(0)
    mux.push(0, mono(50, 1))
    assert len(mux.take()) == 50 * MS * 4  # channel 1 has no handle: padded

    mux.attach(1)
    mux.push(1, mono(30, 2))
    mux.finish(0)
    _, right = channels(mux.take())

    assert right == [2] * 30 * MS


def test_a_handle_attached_with_a_lead_in_maps_its_times_past_it() -> None:
    mux = StereoMux()
    customer = mux.attach(0)
    mux.push(0, mono(500, 1))
    agent = mux.attach(1, lead_in_samples=300 * MS)  # its resend was 300 ms shorter
    mux.push(1, mono(200, 2))

    left, right = channels(mux.flush())

    assert left == [1] * 500 * MS
    assert right == [0] * 300 * MS + [2] * 200 * MS
    assert customer.span(100, 400) == (100, 400)
    assert agent.span(250, 450) == (0, 150)  # starts in the lead-in: cut at the audio
    assert agent.to_handle_ms(500) == 200


def test_flush_pads_the_shorter_channel_to_the_end() -> None:
    mux = StereoMux()
    mux.attach(0)
    mux.attach(1)
    mux.push(0, mono(300, 1))
    mux.push(1, mono(100, 2))

    left, right = channels(mux.take() + mux.flush())

    assert left == [1] * 300 * MS
    assert right == [2] * 100 * MS + [0] * 200 * MS
    assert mux.sent_samples == 300 * MS


def test_an_odd_byte_is_carried_to_the_next_push() -> None:
    mux = StereoMux()
    clock = mux.attach(0)
    pcm = mono(10, 7)
    mux.push(0, pcm[:5])
    mux.push(0, pcm[5:])

    left, _ = channels(mux.take())

    assert left == [7] * 10 * MS and clock.samples == 10 * MS


def test_a_channel_cannot_be_taken_twice() -> None:
    mux = StereoMux()
    mux.attach(0)
    with pytest.raises(ValueError, match="already taken"):
        mux.attach(0)


def test_clock_runs_join_and_padding_between_runs_maps_to_one_point() -> None:
    clock = ChannelClock()
    clock.audio(0, 100 * MS)
    clock.audio(100 * MS, 100 * MS)  # joins the first run
    clock.audio(500 * MS, 100 * MS)  # after 300 ms of padding

    assert clock.to_handle_ms(150) == 150
    assert clock.to_handle_ms(300) == clock.to_handle_ms(499) == 200
    assert clock.to_handle_ms(550) == 250
    assert clock.span(150, 550) == (150, 250)
    assert clock.span(250, 450) is None
    assert clock.span(200, 200) == (200, 200)  # a zero-length word at an edge is kept
