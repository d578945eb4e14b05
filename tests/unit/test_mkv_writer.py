"""The Connect-layout writer: byte layout against a real Connect dump, and round trips."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import ClusterStarted, FrameRead, MkvEvent, StreamError, TagsRead
from callstream.mkv.writer import (
    AUDIO_FROM_CUSTOMER,
    AUDIO_TO_CUSTOMER,
    ConnectCallWriter,
    ConnectTrackLayout,
    pcm_to_blocks,
    write_connect_call,
)

FIXTURES = Path(__file__).resolve().parents[3] / "shared/fixtures/kvs"
SAMPLE_DUMP = FIXTURES / "sample-matroska.txt"
CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
INSTANCE = "3087be6e-771a-48a8-90da-93b5326a43a1"
FRAGMENT = "91343852333181551234925834077012571618243808844"
START_MS = 1782912654536
# offset, size, indentation, element name, the rest ("(ID 0x..): value")
DUMP_ROW = re.compile(r"^\s*(\d+)\s+(\d+)(\s+)(\S+) (.*)$")


def _pcm(seconds: float, seed: int) -> bytes:
    """Deterministic, non-repeating 16-bit PCM."""
    n = int(seconds * 8000) * 2
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


def _read(stream: bytes, chunk: int = 4096) -> list[MkvEvent]:
    reader = MkvStreamReader()
    events: list[MkvEvent] = []
    for i in range(0, len(stream), chunk):
        events += reader.feed(stream[i : i + chunk])
    return events + reader.close()


def _pcm_by_track(events: list[MkvEvent]) -> dict[str | None, bytes]:
    out: dict[str | None, bytes] = {}
    for e in events:
        if isinstance(e, FrameRead):
            out[e.track_name] = out.get(e.track_name, b"") + e.data
    return out


def _dump_rows(text: str) -> list[tuple[int, int, int, str, str]]:
    """Rows of an ebmlite `pprint` listing, below its ==== rule."""
    lines = text.splitlines()
    body = lines[lines.index(next(x for x in lines if x.startswith("===="))) + 1 :]
    rows = []
    for line in body:
        match = DUMP_ROW.match(line)
        assert match, f"unexpected dump line: {line!r}"
        offset, size, indent, name, rest = match.groups()
        rows.append((int(offset), int(size), len(indent), name, rest))
    return rows


def _sample_fragment(**kwargs: bool) -> bytes:
    writer = ConnectCallWriter(CONTACT, INSTANCE, START_MS)
    pcm = bytes(range(256)) * 64  # 32 blocks of 1024 bytes, 16 per track
    return writer.getmedia_fragment(
        pcm,
        pcm,
        fragment_number=FRAGMENT,
        server_ts=1782912654.706,
        producer_ts=1782912654.536,
        millis_behind_now=131207,
        continuation_token=FRAGMENT,
        **kwargs,
    )


@pytest.mark.parametrize("unknown_segment_size", [False, True])
def test_fragment_matches_the_real_connect_dump_element_for_element(
    unknown_segment_size: bool,
) -> None:
    if not SAMPLE_DUMP.exists():
        pytest.skip(f"shared fixture {SAMPLE_DUMP} is not there")
    ebmlite = pytest.importorskip("ebmlite")
    from ebmlite.util import pprint

    data = _sample_fragment(unknown_segment_size=unknown_segment_size)
    schema = ebmlite.loadSchema("matroska.xml")
    listing = io.StringIO()
    pprint(schema.load(io.BytesIO(data), name="MatroskaDocument", headers=True), out=listing)

    ours, real = _dump_rows(listing.getvalue()), _dump_rows(SAMPLE_DUMP.read_text())
    assert len(data) == 34768
    assert len(ours) == len(real) == 135  # the document, 134 elements
    for mine, theirs in zip(ours, real, strict=True):
        assert mine == theirs


def test_round_trip_gives_back_each_tracks_pcm_tags_and_timecodes() -> None:
    customer, agent = _pcm(2.5, 1), _pcm(2.5, 2)  # 2.5 s: the last fragment is short
    events = _read(write_connect_call(customer, agent, CONTACT, start_epoch_ms=START_MS))

    assert not [e for e in events if isinstance(e, StreamError)]
    assert _pcm_by_track(events) == {AUDIO_FROM_CUSTOMER: customer, AUDIO_TO_CUSTOMER: agent}
    clusters = [e.timecode_ms for e in events if isinstance(e, ClusterStarted)]
    assert clusters == [START_MS, START_MS + 1024, START_MS + 2048]
    customer_times = [
        e.timecode_ms
        for e in events
        if isinstance(e, FrameRead) and e.track_name == AUDIO_FROM_CUSTOMER
    ]
    assert customer_times == [START_MS + 64 * i for i in range(len(customer_times))]
    tags = [dict(e.tags) for e in events if isinstance(e, TagsRead)]
    assert {"ContactId": CONTACT} in tags
    assert {"MimeType": "audio/L16;rate=8000;channels=1;"} in tags
    assert {AUDIO_TO_CUSTOMER: "2"} in tags and {AUDIO_FROM_CUSTOMER: "1"} in tags
    numbers = [t["AWS_KINESISVIDEO_FRAGMENT_NUMBER"] for t in tags if len(t) == 3]
    tokens = [t["AWS_KINESISVIDEO_CONTINUATION_TOKEN"] for t in tags if len(t) == 2]
    assert len(numbers) == 3 and numbers == tokens


def test_producer_stream_round_trips_with_known_size_clusters() -> None:
    writer = ConnectCallWriter(CONTACT, INSTANCE, START_MS)
    customer, agent = _pcm(3.0, 3), _pcm(3.0, 4)
    step = writer.fragment_bytes
    stream = writer.producer_header() + b"".join(
        writer.producer_fragment(customer[i : i + step], agent[i : i + step])
        for i in range(0, len(customer), step)
    )
    events = _read(stream, chunk=999)

    assert not [e for e in events if isinstance(e, StreamError)]
    assert _pcm_by_track(events) == {AUDIO_FROM_CUSTOMER: customer, AUDIO_TO_CUSTOMER: agent}
    assert [e.timecode_ms for e in events if isinstance(e, ClusterStarted)] == [
        START_MS + 1024 * i for i in range(3)
    ]
    assert writer.position_ms == START_MS + 3000


def test_tracks_are_numbered_as_the_layout_says_and_read_back_by_name() -> None:
    layout = ConnectTrackLayout(
        to_customer_number=2, to_customer_uid=7, from_customer_number=1, from_customer_uid=9
    )
    customer, agent = _pcm(1.0, 5), _pcm(1.0, 6)
    events = _read(write_connect_call(customer, agent, CONTACT, layout=layout))

    numbers = {e.track_name: e.track_number for e in events if isinstance(e, FrameRead)}
    assert numbers == {AUDIO_FROM_CUSTOMER: 1, AUDIO_TO_CUSTOMER: 2}
    assert _pcm_by_track(events) == {AUDIO_FROM_CUSTOMER: customer, AUDIO_TO_CUSTOMER: agent}
    tags = [dict(e.tags) for e in events if isinstance(e, TagsRead)]
    assert {AUDIO_TO_CUSTOMER: "7"} in tags and {AUDIO_FROM_CUSTOMER: "9"} in tags


def test_tracks_of_different_lengths_are_each_written_whole() -> None:
    customer, agent = _pcm(0.5, 7), _pcm(0.3, 8)
    writer = ConnectCallWriter(CONTACT, INSTANCE, START_MS)
    events = _read(writer.producer_header() + writer.producer_fragment(customer, agent))

    assert _pcm_by_track(events) == {AUDIO_FROM_CUSTOMER: customer, AUDIO_TO_CUSTOMER: agent}
    assert writer.position_ms == START_MS + 500  # the clock follows the longer track


def test_blocks_are_interleaved_in_time_order() -> None:
    events = _read(write_connect_call(_pcm(1.0, 9), _pcm(1.0, 10), CONTACT))
    frames = [e for e in events if isinstance(e, FrameRead)]

    assert [f.timecode_ms for f in frames] == sorted(f.timecode_ms for f in frames)
    assert [f.track_number for f in frames[:4]] == [1, 2, 1, 2]


def test_pcm_is_cut_into_512_sample_blocks_with_a_shorter_last_one() -> None:
    assert [len(b) for b in pcm_to_blocks(bytes(2500))] == [1024, 1024, 452]
    assert pcm_to_blocks(b"") == []
    with pytest.raises(ValueError, match="even length"):
        pcm_to_blocks(bytes(3))


def test_too_much_audio_for_one_cluster_is_refused() -> None:
    writer = ConnectCallWriter(CONTACT, INSTANCE, START_MS)
    with pytest.raises(ValueError, match="16 bits"):
        writer.producer_fragment(bytes(2 * 8000 * 40), b"")
