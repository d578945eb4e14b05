"""The streaming Matroska/KVS reader: real KVS fixtures cross-checked with ebmlite,
chunk-boundary invariance, corruption and truncation, lacing, bounded memory."""

from __future__ import annotations

import functools
import io
import itertools
import tracemalloc
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callstream.mkv import ebml as E
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import (
    ClusterEnded,
    ClusterStarted,
    FrameRead,
    MkvEvent,
    SegmentStarted,
    StreamError,
    TagsRead,
    TracksRead,
)
from callstream.mkv.writer import ConnectCallWriter, write_connect_call

FIXTURES = Path(__file__).resolve().parents[3] / "shared/fixtures/kvs"
MKV_FILES = sorted(FIXTURES.glob("*.mkv")) if FIXTURES.is_dir() else []
CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
INSTANCE = "3087be6e-771a-48a8-90da-93b5326a43a1"
START_MS = 1782912654536
FRAGMENT = "91343852333181551234925834077012571618243808844"
BLOCK_ELEMENT = 1037  # 1 ID + 8 size + 4 block header + 1024 PCM
FIRST_BLOCK = 984  # offset of the first SimpleBlock in a Connect GetMedia fragment
CLUSTER_AT = 966


def _fixture(name: str) -> bytes:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} is not there")
    return path.read_bytes()


def _read(data: bytes, chunk: int = 65536, **kwargs: Any) -> list[MkvEvent]:
    reader = MkvStreamReader(**kwargs)
    events: list[MkvEvent] = []
    for i in range(0, len(data), chunk):
        events += reader.feed(data[i : i + chunk])
    return events + reader.close()


def _read_split(data: bytes, points: list[int]) -> list[MkvEvent]:
    reader = MkvStreamReader()
    events: list[MkvEvent] = []
    cuts = [0, *sorted(points), len(data)]
    for a, b in itertools.pairwise(cuts):
        events += reader.feed(data[a:b])
    return events + reader.close()


def _of(events: list[MkvEvent], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def _frames(events: list[MkvEvent]) -> list[FrameRead]:
    return _of(events, FrameRead)


def _pcm(seconds: float, seed: int) -> bytes:
    n = int(seconds * 8000) * 2
    return bytes((i * 7 + seed * 13 + (i >> 9)) & 0xFF for i in range(n))


def _connect_stream(fragments: int, **kwargs: Any) -> bytes:
    seconds = fragments * 1.024
    return write_connect_call(_pcm(seconds, 1), _pcm(seconds, 2), CONTACT, **kwargs)


def _one_fragment(pcm: bytes | None = None) -> bytes:
    writer = ConnectCallWriter(CONTACT, INSTANCE, START_MS)
    return writer.getmedia_fragment(
        pcm or _pcm(1.024, 3),
        pcm or _pcm(1.024, 4),
        fragment_number=FRAGMENT,
        server_ts=1782912654.706,
        producer_ts=1782912654.536,
        millis_behind_now=131207,
        continuation_token=FRAGMENT,
    )  # the real sample's values, so element offsets are those of sample-matroska.txt


# -- ebmlite as the reference --------------------------------------------------------


def _ebmlite_reference(data: bytes) -> dict[str, Any]:
    """What ebmlite sees: frames per track, cluster timecodes, tags, cut-off blocks."""
    ebmlite = pytest.importorskip("ebmlite")
    schema = ebmlite.loadSchema("matroska.xml")
    ref: dict[str, Any] = {"frames": defaultdict(list), "timecodes": [], "tags": [], "cut": []}
    ref["tags_elements"] = 0
    scale = [1_000_000]

    def walk(element: Any) -> None:
        for child in element:
            if child.name == "Tags":
                ref["tags_elements"] += 1
            if isinstance(child, ebmlite.core.MasterElement):
                walk(child)
            elif child.name == "TimecodeScale":
                scale[0] = child.value
            elif child.name == "Timecode":
                ref["timecodes"].append(child.value * scale[0] // 1_000_000)
            elif child.name == "TagName":
                ref["tags"].append([child.value.rstrip("\0"), ""])
            elif child.name == "TagString":
                ref["tags"][-1][1] = child.value.rstrip("\0")
            elif child.name == "SimpleBlock":
                if child.payloadOffset + child.size > len(data):
                    ref["cut"].append(child.offset)  # ebmlite silently returns a short payload
                    continue
                block = bytes(child.value)
                assert block[0] & 0x80 and not block[3] & 0x06, "fixtures use no lacing"
                ref["frames"][block[0] & 0x7F].append(block[4:])

    walk(schema.load(io.BytesIO(data), headers=True))
    return ref


@pytest.mark.parametrize("path", MKV_FILES, ids=[p.name for p in MKV_FILES])
def test_agrees_with_ebmlite_on_every_kvs_fixture(path: Path) -> None:
    data = path.read_bytes()
    ref = _ebmlite_reference(data)
    events = _read(data)

    frames: dict[int, list[bytes]] = defaultdict(list)
    for frame in _frames(events):
        frames[frame.track_number].append(frame.data)
    assert {k: len(v) for k, v in frames.items()} == {k: len(v) for k, v in ref["frames"].items()}
    for track, payloads in ref["frames"].items():
        assert b"".join(frames[track]) == b"".join(payloads)
    assert [e.timecode_ms for e in _of(events, ClusterStarted)] == ref["timecodes"]
    assert [p for e in _of(events, TagsRead) for p in e.tags] == [tuple(t) for t in ref["tags"]]
    assert len(_of(events, TagsRead)) == ref["tags_elements"]
    assert [e.offset for e in _of(events, StreamError)] == ref["cut"]


# -- what SOURCES.md says about each fixture --------------------------------------------


def test_mixed_tags_fixture_has_ten_fragments_with_custom_tags_around_clusters() -> None:
    events = _read(_fixture("test_mixed_tags.mkv"))

    assert len(_of(events, SegmentStarted)) == 10
    assert [e.timecode_ms for e in _of(events, ClusterStarted)] == list(range(0, 50000, 5000))
    assert [len(_frames(events))] == [100]
    assert {f.track_name for f in _frames(events)} == {"test track"}  # NUL padding stripped
    tracks = _of(events, TracksRead)[0].tracks
    assert (tracks[0].name, tracks[0].codec_id) == ("test track", "V_MS/VFW/FOURCC")
    first_tags = dict(
        p for e in events[: events.index(_of(events, TracksRead)[0])] for p in _tags(e)
    )
    assert {f"testTag_{i}": f"testTag_{i}_Value" for i in range(5)}.items() <= first_tags.items()
    ends = [i for i, e in enumerate(events) if isinstance(e, ClusterEnded)]
    for end in ends:
        assert events[end + 1 : end + 6] and ("testTag_0", "testTag_0_Value") in [
            p for e in events[end + 1 : end + 8] for p in _tags(e)
        ]
    numbers = [v for e in events for n, v in _tags(e) if n == "AWS_KINESISVIDEO_FRAGMENT_NUMBER"]
    assert numbers[0] == "91343852333713038908964877623801423530396737899"


def _tags(event: MkvEvent) -> tuple[tuple[str, str], ...]:
    return event.tags if isinstance(event, TagsRead) else ()


def test_tags_only_segment_gives_tags_and_no_cluster() -> None:
    events = _read(_fixture("test_tags_empty_cluster.mkv"))

    assert [type(e) for e in events] == [SegmentStarted] + [TagsRead] * 5
    assert [e.tags for e in _of(events, TagsRead)] == [
        ((f"testTag_{i}", f"testTag_{i}_Value"),) for i in range(5)
    ]


def test_fragment_without_cluster_gives_tracks_and_fragment_tags() -> None:
    events = _read(_fixture("empty-mkv-with-tags.mkv"))

    assert not _of(events, ClusterStarted) and not _frames(events)
    assert not _of(events, StreamError)
    assert _of(events, TracksRead)[0].tracks[0].codec_id == "V_MPEG4/ISO/AVC"
    tags = dict(p for e in events for p in _tags(e))
    assert tags["AWS_KINESISVIDEO_FRAGMENT_NUMBER"] == (
        "91343852338378294813695855977007281634605393997"
    )


def test_sparse_fragments_keep_their_timecode_gaps() -> None:
    events = _read(_fixture("output_get_media_sparse_fragments.mkv"))

    assert [e.timecode_ms for e in _of(events, ClusterStarted)] == [0, 4000, 8000]
    numbers = [
        int(v) for e in events for n, v in _tags(e) if n == "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
    ]
    assert len(numbers) == 3 and numbers == sorted(numbers)


def test_non_increasing_timecodes_are_reported_as_written() -> None:
    events = _read(_fixture("output-get-media-non-increasing-timecode.mkv"))

    timecodes = [e.timecode_ms for e in _of(events, ClusterStarted)]
    assert timecodes[:3] == [10014, 0, 1001] and timecodes[-1] == 10014
    assert len(timecodes) == 12


def test_stream_cut_inside_its_last_block_keeps_earlier_frames_and_says_where() -> None:
    # The last fragment has no trailing MILLIS/CONTINUATION tags: the file ends
    # 4660 bytes short, inside the Cluster's last SimpleBlock.
    data = _fixture("output-get-media-equal-timecode.mkv")
    events = _read(data)

    assert [e.timecode_ms for e in _of(events, ClusterStarted)] == [0, 0]
    assert len(_frames(events)) == 239
    last_segment = events[events.index(_of(events, SegmentStarted)[-1]) :]
    assert not [n for e in last_segment for n, _ in _tags(e) if "MILLIS" in n]
    (error,) = _of(events, StreamError)
    assert error.offset == 1272988 and "SimpleBlock" in error.reason
    assert events[-1] == error


def test_interleaved_video_and_audio_tracks_are_told_apart() -> None:
    events = _read(_fixture("vogels_330.mkv"))

    tracks = {t.number: t for t in _of(events, TracksRead)[0].tracks}
    stereo = tracks[2]
    assert (stereo.name, stereo.codec_id, stereo.track_type) == ("Stereo", "A_AAC", 2)
    assert (stereo.sampling_frequency, stereo.channels) == (48000.0, 2)
    by_track: dict[tuple[int, str | None], int] = defaultdict(int)
    for frame in _frames(events):
        by_track[(frame.track_number, frame.track_name)] += 1
    assert by_track == {(1, None): 909, (2, "Stereo"): 1425}
    assert len(_of(events, ClusterStarted)) == len(_of(events, ClusterEnded)) == 9


# -- building blocks for hand-made streams -------------------------------------------------------


def _tracks() -> bytes:
    entry = (
        E.uint_element(E.TRACK_NUMBER, 1)
        + E.uint_element(E.TRACK_UID, 1)
        + E.uint_element(E.TRACK_TYPE, 2)
        + E.str_element(E.NAME, "t")
    )
    return E.element(E.TRACKS, E.element(E.TRACK_ENTRY, entry))


def _segment(body: bytes) -> bytes:
    head = E.ebml_header() + E.encode_id(E.SEGMENT) + E.encode_size(E.UNKNOWN_SIZE)
    return head + _tracks() + body


def _cluster(timecode: int, body: bytes) -> bytes:
    return E.element(E.CLUSTER, E.uint_element(E.TIMECODE, timecode) + body)


def _block(track: int, relative: int, flags: int, payload: bytes) -> bytes:
    header = bytes([0x80 | track]) + relative.to_bytes(2, "big", signed=True) + bytes([flags])
    return E.element(E.SIMPLE_BLOCK, header + payload)


def _laced_stream() -> bytes:
    a, b, c = b"A" * 300, b"B" * 10, b"C" * 5
    xiph = bytes([2, 255, 45, 10]) + a + b + c
    d, e, f = b"D" * 300, b"E" * 10, b"F" * 5
    # EBML lacing: first size as a VINT, then signed differences (10 - 300 = -290).
    ebml = (
        bytes([2]) + E.encode_size(300, 2) + (-290 + 8191 | 0x4000).to_bytes(2, "big") + d + e + f
    )
    fixed = bytes([2]) + b"G" * 4 + b"H" * 4 + b"I" * 4
    blocks = _block(1, 0, 0x82, xiph) + _block(1, 1, 0x86, ebml) + _block(1, 2, 0x84, fixed)
    return _segment(_cluster(1000, blocks))


# -- chunk boundaries ---------------------------------------------------------------------


SOURCE_NAMES = ["connect", "garbage_and_cut", "laced", "ends_in_skipped_cues"] + (
    ["mixed_tags"] if (FIXTURES / "test_mixed_tags.mkv").exists() else []
)


@functools.cache
def _source(name: str) -> bytes:
    if name == "connect":
        return _connect_stream(2, unknown_segment_size=True)
    if name == "garbage_and_cut":
        fragment = _one_fragment()
        return fragment + b"\x1a\x45\xdf\xa3junk" * 9 + fragment[:-700]
    if name == "laced":
        return _laced_stream()
    if name == "ends_in_skipped_cues":
        body = _tracks() + _cluster(5, _block(1, 0, 0x80, b"pcm")) + E.element(E.CUES, bytes(3000))
        return E.ebml_header() + E.element(E.SEGMENT, body)
    return (FIXTURES / "test_mixed_tags.mkv").read_bytes()


@functools.cache
def _whole(name: str) -> list[MkvEvent]:
    return _read(_source(name), chunk=len(_source(name)))


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_feeding_one_byte_at_a_time_gives_the_same_events(name: str) -> None:
    assert _read(_source(name), chunk=1) == _whole(name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), name=st.sampled_from(SOURCE_NAMES))
def test_events_do_not_depend_on_chunk_boundaries(data: st.DataObject, name: str) -> None:
    stream = _source(name)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="split points")
    assert _read_split(stream, points) == _whole(name)


# -- corruption and truncation --------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(position=st.integers(0, 3 * 34700), mask=st.integers(1, 255))
def test_a_flipped_byte_never_loses_the_frames_before_it(position: int, mask: int) -> None:
    clean = _connect_stream(3)
    position = min(position, len(clean) - 1)
    corrupt = bytearray(clean)
    corrupt[position] ^= mask

    before = _frames(_read(clean[:position]))
    after = _frames(_read(bytes(corrupt), chunk=4093))
    assert after[: len(before)] == before


def test_corrupt_cluster_id_is_reported_and_the_next_fragment_decoded() -> None:
    clean = _connect_stream(3)
    starts = [e.offset for e in _of(_read(clean), SegmentStarted)]
    corrupt = bytearray(clean)
    cluster = clean.index(E.encode_id(E.CLUSTER), starts[1])
    corrupt[cluster] ^= 0xFF
    events = _read(bytes(corrupt))

    (error,) = _of(events, StreamError)
    assert error.offset == cluster and "cannot be in Segment" in error.reason
    assert [e.offset for e in _of(events, SegmentStarted)] == starts
    clean_frames = _frames(_read(clean))
    assert _frames(events) == clean_frames[:32] + clean_frames[64:]


def test_resyncs_at_next_ebml_header_after_garbage() -> None:
    fragment = _one_fragment()
    garbage = bytes(range(7, 250)) * 3
    events = _read(fragment + garbage + fragment)

    (error,) = _of(events, StreamError)
    assert error.offset == len(fragment)
    assert [e.offset for e in _of(events, SegmentStarted)] == [0, len(fragment) + len(garbage)]
    one = _frames(_read(fragment))
    assert _frames(events) == one + one


def test_fake_ebml_magic_inside_pcm_does_not_resync() -> None:
    fakes = (
        b"\x1a\x45\xdf\xa3\x00\x00\x00\x00"  # size VINT invalid
        + b"\x1a\x45\xdf\xa3\x84\x12\x34\x56"  # first child is not EBMLVersion
        + b"\x1a\x45\xdf\xa3\xa3\x42\x86\x00"  # EBMLVersion with an invalid size
        + b"\x1a\x45\xdf\xa3\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size
    )
    fragment = _one_fragment((fakes * 700)[: 2 * 8192])
    stream = fragment + fragment
    assert not _of(_read(stream), StreamError)  # intact: the magic in PCM is just PCM

    corrupt = bytearray(stream)
    corrupt[CLUSTER_AT] ^= 0xFF  # resynchronising starts before all that PCM
    events = _read(bytes(corrupt))
    assert len(_of(events, StreamError)) == 1
    assert [e.offset for e in _of(events, SegmentStarted)] == [0, len(fragment)]
    assert _frames(events) == _frames(_read(fragment))


def test_truncated_tail_is_reported_at_close_with_the_cut_element() -> None:
    fragment = _one_fragment()
    cut_block = FIRST_BLOCK + 3 * BLOCK_ELEMENT
    reader = MkvStreamReader()
    events = reader.feed(fragment[: cut_block + 500])
    assert len(_frames(events)) == 3 and not _of(events, StreamError)

    (error,) = reader.close()
    assert isinstance(error, StreamError) and error.offset == cut_block
    assert "SimpleBlock" in error.reason and "537 of its 1028 bytes missing" in error.reason


@pytest.mark.parametrize(
    ("cut", "offset", "words"),
    [
        (FIRST_BLOCK + 3, FIRST_BLOCK, "element header"),
        (320, 295, "Tags at offset 295"),
        (FIRST_BLOCK + 2 * BLOCK_ELEMENT, 40, "Segment at offset 40"),
    ],
)
def test_truncation_names_what_was_cut(cut: int, offset: int, words: str) -> None:
    (error,) = _of(_read(_one_fragment()[:cut]), StreamError)
    assert error.offset == offset and words in error.reason


def test_unknown_size_stream_ending_between_elements_is_not_an_error() -> None:
    stream = _connect_stream(1, unknown_segment_size=True)
    events = _read(stream[: stream.index(E.encode_id(E.TAGS), 2000)])

    assert not _of(events, StreamError)
    assert isinstance(events[-1], ClusterEnded) and len(_frames(events)) == 32


def test_block_larger_than_the_limit_is_corruption() -> None:
    events = _read(_one_fragment(), max_element_size=1000)
    (error,) = _of(events, StreamError)
    assert error.offset == FIRST_BLOCK and "claims 1028 bytes" in error.reason


def test_feed_after_close_is_refused() -> None:
    reader = MkvStreamReader()
    reader.close()
    with pytest.raises(ValueError, match="after close"):
        reader.feed(b"\x1a")


# -- structure ---------------------------------------------------------------------------------


def test_first_frame_comes_out_as_soon_as_its_block_is_complete() -> None:
    fragment = _one_fragment()
    reader = MkvStreamReader()
    assert not _frames(reader.feed(fragment[: FIRST_BLOCK + BLOCK_ELEMENT - 1]))
    assert len(_frames(reader.feed(fragment[FIRST_BLOCK + BLOCK_ELEMENT - 1 :][:1]))) == 1


def test_segment_started_offset_is_where_each_fragment_starts() -> None:
    stream = _connect_stream(3, unknown_segment_size=True)
    starts = [e.offset for e in _of(_read(stream), SegmentStarted)]
    assert starts == [i for i in range(len(stream)) if stream.startswith(E.ebml_header(), i)]


def test_unknown_size_cluster_ends_where_its_known_size_segment_ends() -> None:
    cluster = E.encode_id(E.CLUSTER) + b"\xff" + E.uint_element(E.TIMECODE, 5)
    segment = E.element(E.SEGMENT, _tracks() + cluster + _block(1, 0, 0x80, b"pcm!"))
    stream = (E.ebml_header() + segment) * 2
    events = _read(stream)

    assert not _of(events, StreamError)
    assert [type(e) for e in events].count(ClusterEnded) == 2
    assert _of(events, ClusterEnded)[0].offset == len(stream) // 2


def test_unknown_size_cluster_ends_at_the_next_cluster() -> None:
    def cluster(timecode: int) -> bytes:
        return E.encode_id(E.CLUSTER) + b"\xff" + E.uint_element(E.TIMECODE, timecode)

    body = cluster(10) + _block(1, 1, 0x80, b"a") + cluster(20) + _block(1, 2, 0x80, b"b")
    events = _read(_segment(body))

    assert [type(e).__name__ for e in events if not isinstance(e, TracksRead)] == [
        "SegmentStarted",
        "ClusterStarted",
        "FrameRead",
        "ClusterEnded",
        "ClusterStarted",
        "FrameRead",
        "ClusterEnded",
    ]
    assert [(f.timecode_ms, f.data) for f in _frames(events)] == [(11, b"a"), (22, b"b")]


def test_timecode_scale_converts_to_milliseconds() -> None:
    info = E.element(E.INFO, E.uint_element(E.TIMECODE_SCALE, 500_000))
    body = info + _cluster(4000, _block(1, -10, 0x80, b"x"))
    events = _read(_segment(body))

    assert _of(events, ClusterStarted)[0].timecode_ms == 2000
    assert _frames(events)[0].timecode_ms == 1995


def test_laced_blocks_give_one_frame_per_laced_frame() -> None:
    frames = _frames(_read(_laced_stream()))

    assert [(f.data, f.timecode_ms) for f in frames] == [
        (b"A" * 300, 1000),
        (b"B" * 10, 1000),
        (b"C" * 5, 1000),
        (b"D" * 300, 1001),
        (b"E" * 10, 1001),
        (b"F" * 5, 1001),
        (b"G" * 4, 1002),
        (b"H" * 4, 1002),
        (b"I" * 4, 1002),
    ]
    assert all(f.track_name == "t" for f in frames)


def test_block_group_block_is_a_keyframe_unless_it_references_another() -> None:
    header = bytes([0x81, 0, 7, 0])
    plain = E.element(E.BLOCK_GROUP, E.element(E.BLOCK, header + b"key"))
    referencing = E.element(
        E.BLOCK_GROUP, E.element(E.REFERENCE_BLOCK, b"\xc0") + E.element(E.BLOCK, header + b"p")
    )
    frames = _frames(_read(_segment(_cluster(100, plain + referencing))))

    assert [(f.data, f.keyframe, f.timecode_ms) for f in frames] == [
        (b"key", True, 107),
        (b"p", False, 107),
    ]


def test_nested_simple_tags_are_flattened_parent_first() -> None:
    inner = E.simple_tag("inner", "2")
    outer = E.element(
        E.SIMPLE_TAG,
        E.str_element(E.TAG_NAME, "outer") + inner + E.str_element(E.TAG_STRING, "1\0\0"),
    )
    tags = E.element(E.TAGS, E.element(E.TAG, outer + E.simple_tag("next", "3")))
    (event,) = _of(_read(_segment(tags)), TagsRead)

    assert event.tags == (("outer", "1"), ("inner", "2"), ("next", "3"))


def test_large_tags_element_streams_and_reads_the_same_as_a_small_one() -> None:
    pairs = [("ContactId", CONTACT), ("Events", "[]")]
    small = E.tags_element(pairs)
    void = E.element(E.VOID, bytes(100_000))
    large = E.element(E.TAGS, E.element(E.TAG, void + b"".join(E.simple_tag(*p) for p in pairs)))
    events = _read(_segment(small + large), chunk=8192)

    assert [e.tags for e in _of(events, TagsRead)] == [tuple(pairs), tuple(pairs)]


def test_skipped_elements_are_not_buffered() -> None:
    head = E.ebml_header() + E.encode_id(E.SEGMENT) + E.encode_size(E.UNKNOWN_SIZE)
    void_size = 50 * 1024 * 1024
    void = E.encode_id(E.VOID) + E.encode_size(void_size, 8)
    tail = E.tags_element([("after", "void")])
    reader = MkvStreamReader()
    chunk = bytes(65536)
    tracemalloc.start()
    try:
        events = reader.feed(head + void)
        for _ in range(void_size // len(chunk)):
            events += reader.feed(chunk)
        events += reader.feed(tail) + reader.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 1024 * 1024
    assert _of(events, TagsRead)[0].offset == len(head) + len(void) + void_size


def test_memory_stays_bounded_over_a_long_stream() -> None:
    stream = _connect_stream(40)
    reader = MkvStreamReader()
    tracemalloc.start()
    try:
        frames = 0
        for i in range(0, len(stream), 65536):
            frames += len(_frames(reader.feed(stream[i : i + 65536])))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert frames == 40 * 32
    assert peak < 1024 * 1024  # a chunk, a buffered block and one chunk's frames
