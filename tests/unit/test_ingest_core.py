"""Ingest core on Connect-layout streams built by the writer and read by the reader."""

from __future__ import annotations

import random

from callstream.events import AudioChunkCaptured, CallEnded, EndReason, Track
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.writer import ConnectCallWriter, write_connect_call
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


# -- resume mid-fragment, gaps -----------------------------------------------------------


def _fragments(customer: bytes, agent: bytes, gap_after: int | None = None, gap_ms: int = 0):
    """GetMedia fragments one by one; `gap_ms` of audio missing after fragment `gap_after`."""
    writer = ConnectCallWriter(CONTACT, "instance", 1_000_000)
    step, parts = writer.fragment_bytes, []
    for index, offset in enumerate(range(0, len(customer), step)):
        number = str(10**46 + 7 * index)  # KVS numbers increase, not by one
        parts.append(
            writer.getmedia_fragment(
                customer[offset : offset + step],
                agent[offset : offset + step],
                fragment_number=number,
                server_ts=writer.position_ms / 1000,
                producer_ts=writer.position_ms / 1000,
                millis_behind_now=0,
                continuation_token=number,
            )
        )
        if index == gap_after:
            writer.samples_written += gap_ms * 8
    return parts


def _feed(core: CallIngest, data: bytes, piece: int = 1000, close: bool = True) -> list:
    reader, out = MkvStreamReader(), []
    for i in range(0, len(data), piece):
        for event in reader.feed(data[i : i + piece]):
            out.extend(core.accept(event))
    for event in reader.close() if close else []:
        out.extend(core.accept(event))
    return out


def test_resume_mid_fragment_skips_exactly_what_was_taken() -> None:
    customer, agent = _pcm(4.0, 20), _pcm(4.0, 21)
    parts = _fragments(customer, agent)
    whole = b"".join(parts)
    rng = random.Random(5)
    cuts = [rng.randrange(len(parts[0]), len(parts[0]) + len(parts[1])) for _ in range(40)]
    for cut in [len(parts[0]) + len(parts[1]) - 30, *cuts]:
        core = CallIngest(CONTACT, 128)
        events = _feed(core, whole[:cut], close=False)  # the connection drops here
        resumed = b"".join(parts[1:])  # CONTINUATION_TOKEN = fragment 0's token
        events += _feed(core, resumed, piece=777)
        events += core.finish(EndReason.END_OF_STREAM, "test", 0)
        assert _pcm_of(events, Track.FROM_CUSTOMER) == customer, cut
        assert _pcm_of(events, Track.TO_CUSTOMER) == agent, cut


def test_resumed_chunks_are_not_delayed_to_the_fragment_end() -> None:
    customer, agent = _pcm(2.0, 22), _pcm(2.0, 23)
    parts = _fragments(customer, agent)
    core = CallIngest(CONTACT, 128)
    _feed(core, b"".join(parts)[: len(parts[0]) + len(parts[1]) // 2], close=False)
    header_and_half = parts[1][: len(parts[1]) * 3 // 4]
    events = _feed(core, header_and_half, close=False)
    assert any(isinstance(e, AudioChunkCaptured) for e in events)


def test_a_missing_fragment_is_reported_as_a_gap_on_the_next_chunk() -> None:
    customer, agent = _pcm(3.0, 24), _pcm(3.0, 25)
    parts = _fragments(customer, agent, gap_after=0, gap_ms=1024)
    core = CallIngest(CONTACT, 128)
    events = _feed(core, b"".join(parts)) + core.finish(EndReason.END_OF_STREAM, "t", 0)
    assert _pcm_of(events, Track.FROM_CUSTOMER) == customer
    for track in Track:
        chunks = [e for e in events if isinstance(e, AudioChunkCaptured) and e.track is track]
        gaps = [(c.sequence, c.gap_before_ms) for c in chunks if c.gap_before_ms]
        first_after = next(c for c in chunks if c.start_time_ms >= 1_000_000 + 1024 + 1024)
        assert gaps == [(first_after.sequence, 1024)]
        assert first_after.start_time_ms == 1_000_000 + 1024 + 1024
        before = chunks[first_after.sequence - 1]
        assert before.start_time_ms + len(before.pcm) // 16 == 1_000_000 + 1024


def test_contiguous_fragments_have_no_gap() -> None:
    parts = _fragments(_pcm(3.0, 26), _pcm(3.0, 27))
    core = CallIngest(CONTACT, 128)
    events = _feed(core, b"".join(parts))
    assert all(e.gap_before_ms == 0 for e in events if isinstance(e, AudioChunkCaptured))


def test_a_corrupt_fragment_is_skipped_and_the_audio_around_it_kept() -> None:
    customer, agent = _pcm(4.0, 28), _pcm(4.0, 29)
    parts = _fragments(customer, agent)
    damaged = bytearray(parts[1])
    damaged[damaged.find(b"\x1f\x43\xb6\x75")] ^= 0xFF  # the Cluster ID
    core = CallIngest(CONTACT, 128)
    events = _feed(core, parts[0] + bytes(damaged) + b"".join(parts[2:]))
    events += core.finish(EndReason.END_OF_STREAM, "t", 0)
    step = 16384  # one fragment
    assert _pcm_of(events, Track.FROM_CUSTOMER) == customer[:step] + customer[2 * step :]
    assert _pcm_of(events, Track.TO_CUSTOMER) == agent[:step] + agent[2 * step :]
    gaps = [e.gap_before_ms for e in events if isinstance(e, AudioChunkCaptured)]
    assert sorted(g for g in gaps if g) == [1024, 1024]
    assert events[-1].stream_errors >= 1


def test_a_truncated_stream_keeps_what_came_before() -> None:
    customer, agent = _pcm(2.0, 30), _pcm(2.0, 31)
    parts = _fragments(customer, agent)
    core = CallIngest(CONTACT, 128)
    events = _feed(core, parts[0] + parts[1][: len(parts[1]) // 2])
    events += core.finish(EndReason.END_OF_STREAM, "t", 0)
    got = _pcm_of(events, Track.FROM_CUSTOMER)
    assert len(got) > len(customer) // 2 + len(customer) // 8
    assert customer.startswith(got)
    assert events[-1].stream_errors == 1


def test_first_chunk_of_a_fragment_does_not_wait_for_the_fragment_end() -> None:
    parts = _fragments(_pcm(1.024, 32), _pcm(1.024, 33))
    core = CallIngest(CONTACT, 128)
    cluster = parts[0].find(b"\x1f\x43\xb6\x75")
    # Header, tags and the first 2 blocks of each track (~128 ms) of a 1 s fragment:
    events = _feed(core, parts[0][: cluster + 4 * (1024 + 8) + 40], close=False)
    chunks = [e for e in events if isinstance(e, AudioChunkCaptured)]
    assert {c.track for c in chunks} == set(Track)
    assert all(len(c.pcm) == 128 * 16 for c in chunks)
