"""Ingest core on Connect-layout streams built by the writer and read by the reader."""

from __future__ import annotations

import random

from callstream.events import AudioChunkCaptured, CallEnded, EndReason, Track
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.writer import write_connect_call
from services.ingest.core import CallIngest

CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"


def _pcm(seconds: float, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(int(seconds * 16000)))


def _run(stream: bytes, contact: str = CONTACT, chunk_ms: int = 128, piece: int = 4096) -> list:
    core = CallIngest(contact, chunk_ms)
    reader = MkvStreamReader()
    out = []
    for i in range(0, len(stream), piece):
        for event in reader.feed(stream[i : i + piece]):
            out.extend(core.accept(event))
    for event in reader.close():
        out.extend(core.accept(event))
    out.extend(core.finish(EndReason.END_OF_STREAM, "test", 0))
    return out


def _pcm_of(events: list, track: Track) -> bytes:
    chunks = [e for e in events if isinstance(e, AudioChunkCaptured) and e.track is track]
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    return b"".join(c.pcm for c in chunks)


def test_publishes_exactly_the_pcm_of_each_track_in_order() -> None:
    customer, agent = _pcm(3.3, 1), _pcm(3.3, 2)
    events = _run(write_connect_call(customer, agent, CONTACT))
    assert _pcm_of(events, Track.FROM_CUSTOMER) == customer
    assert _pcm_of(events, Track.TO_CUSTOMER) == agent
    ended = events[-1]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.END_OF_STREAM
    counts = ended.chunk_counts
    assert counts[Track.FROM_CUSTOMER.value] == sum(
        isinstance(e, AudioChunkCaptured) and e.track is Track.FROM_CUSTOMER for e in events
    )


def test_chunk_offsets_and_absolute_times_follow_the_cluster_timecode() -> None:
    customer = agent = _pcm(2.048, 3)
    events = _run(write_connect_call(customer, agent, CONTACT, start_epoch_ms=1_000_000))
    chunks = [
        e for e in events if isinstance(e, AudioChunkCaptured) and e.track is Track.TO_CUSTOMER
    ]
    assert all(len(c.pcm) == 128 * 16 for c in chunks)
    assert [c.offset_ms for c in chunks] == [128 * i for i in range(16)]
    assert [c.start_time_ms for c in chunks] == [1_000_000 + 128 * i for i in range(16)]
    assert events[-1].call_start_time_ms == 1_000_000


def test_chunking_does_not_depend_on_how_bytes_arrive() -> None:
    stream = write_connect_call(_pcm(2.5, 4), _pcm(2.5, 5), CONTACT)
    assert _run(stream, piece=1 << 20)[:-1] == _run(stream, piece=97)[:-1]


def test_ends_with_contact_changed_when_the_stream_carries_the_next_contact() -> None:
    first = write_connect_call(_pcm(2.0, 6), _pcm(2.0, 7), CONTACT)
    second = write_connect_call(
        _pcm(1.0, 8), _pcm(1.0, 9), "next-contact", first_fragment_number=10**46 + 500
    )
    events = _run(first + second)
    assert _pcm_of(events, Track.FROM_CUSTOMER) == _pcm(2.0, 6)
    assert events[-1].reason is EndReason.CONTACT_CHANGED
    assert "next-contact" in events[-1].detail


def test_a_fragment_read_twice_is_published_once() -> None:
    customer, agent = _pcm(3.0, 10), _pcm(3.0, 11)
    stream = write_connect_call(customer, agent, CONTACT)
    first_fragment = write_connect_call(customer[:16384], agent[:16384], CONTACT)
    events = _run(first_fragment + stream)
    assert _pcm_of(events, Track.FROM_CUSTOMER) == customer
    assert _pcm_of(events, Track.TO_CUSTOMER) == agent
