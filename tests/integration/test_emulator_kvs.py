"""The emulator's KVS endpoints through real boto3 and the PutMedia client.

GetMedia streams a fragment as PutMedia stores it (block by block, never held
until the next fragment starts), as real KVS does.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from callstream.mkv import FrameRead, MkvStreamReader
from callstream.mkv import ebml as E
from callstream_emulator.emulator import Emulator
from callstream_emulator.faults import remote_faults
from callstream_emulator.kvs_producer import KvsMediaError, put_media

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[3] / "shared/fixtures/kvs"
CONTACT_ID = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
START_MS = 1_782_912_654_536
FRAGMENT_MS = 256
AWS_TAG = b"AWS_KINESISVIDEO_CONTINUATION_TOKEN"


# -- building Connect-style producer streams --------------------------------------


def track_entry(number: int, name: str) -> bytes:
    return E.element(
        E.TRACK_ENTRY,
        E.uint_element(E.TRACK_NUMBER, number)
        + E.uint_element(E.TRACK_UID, 3 - number, 8)
        + E.uint_element(E.TRACK_TYPE, 2)
        + E.str_element(E.NAME, name)
        + E.str_element(E.CODEC_ID, "A_AAC")
        + E.element(E.CODEC_PRIVATE, b"\x15\x88"),
    )


def stream_header() -> bytes:
    info = E.element(
        E.INFO,
        E.uint_element(E.TIMECODE_SCALE, 1_000_000)
        + E.str_element(E.TITLE, "Kinesis Video SDK")
        + E.str_element(E.MUXING_APP, "Kinesis Video SDK 1.1.0 JNI 2.0")
        + E.str_element(E.WRITING_APP, "Kinesis Video SDK 1.1.0 JNI 2.0"),
    )
    tracks = E.element(
        E.TRACKS, track_entry(1, "AUDIO_TO_CUSTOMER") + track_entry(2, "AUDIO_FROM_CUSTOMER")
    )
    segment = E.encode_id(E.SEGMENT) + E.encode_size(E.UNKNOWN_SIZE)
    return E.ebml_header() + segment + info + tracks


CONNECT_TAG_NAMES = ["ContactId", "MimeType", "AUDIO_TO_CUSTOMER", "AUDIO_FROM_CUSTOMER"]


def connect_tags(contact_id: str) -> list[bytes]:
    return [
        E.tags_element([("ContactId", contact_id)]),
        E.tags_element([("MimeType", "audio/L16;rate=8000;channels=1;")]),
        E.tags_element([("AUDIO_TO_CUSTOMER", "2")]),
        E.tags_element([("AUDIO_FROM_CUSTOMER", "1")]),
    ]


def cluster(index: int, *, unknown_size: bool = False, blocks: int = 4) -> bytes:
    """A Cluster of `blocks` SimpleBlocks per track; PCM bytes unique per fragment."""
    body = E.uint_element(E.TIMECODE, START_MS + index * FRAGMENT_MS, 8)
    body += E.uint_element(E.POSITION, 0)
    for block in range(blocks):
        for track in (1, 2):
            pcm = bytes([(index * 7 + block + track) % 256]) * 128
            header = bytes([0x80 | track]) + (block * 64).to_bytes(2, "big") + b"\x80"
            body += E.element(E.SIMPLE_BLOCK, header + pcm)
    if unknown_size:
        return E.encode_id(E.CLUSTER) + E.encode_size(E.UNKNOWN_SIZE) + body
    return E.element(E.CLUSTER, body)


@dataclass
class ProducerStream:
    """Chunks to send plus what GetMedia must give back."""

    chunks: list[bytes]
    clusters: list[bytes]
    contact_id: str = CONTACT_ID


def connect_stream(
    fragments: int, *, unknown_size: bool = False, segment_per_fragment: bool = True
) -> ProducerStream:
    """Connect's layout: per fragment leading tags, Cluster, repeated tags + a marker.

    With `segment_per_fragment` each fragment is its own EBML header + Segment
    (as in GetMedia outputs), which pins down which tags lead and which trail;
    otherwise one Segment holds every fragment.
    """
    chunks = [] if segment_per_fragment else [stream_header()]
    clusters = []
    for index in range(fragments):
        body = cluster(index, unknown_size=unknown_size)
        clusters.append(body)
        head = stream_header() if segment_per_fragment else b""
        chunks.append(head + b"".join(connect_tags(CONTACT_ID)))
        chunks.append(body)
        marker = E.tags_element([("TrailingMarker", str(index))])
        chunks.append(b"".join(connect_tags(CONTACT_ID)) + marker)
    return ProducerStream(chunks, clusters)


# -- reading GetMedia output --------------------------------------------------------


@dataclass
class Document:
    """One EBML+Segment document of a GetMedia response."""

    elements: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster(self) -> bytes:
        return next(raw for eid, raw in self.elements if eid == E.CLUSTER)

    def tags(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for eid, raw in self.elements:
            if eid == E.TAGS:
                found.extend(simple_tags(raw))
        return found

    def tag(self, name: str) -> str:
        return dict(self.tags())[name]

    @property
    def number(self) -> str:
        return self.tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER")


def walk(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Segment-level elements (whole bytes); a Segment yields only its header."""
    pos = 0
    while pos < len(data):
        eid, id_len = E.read_id(data, pos)
        size, size_len = E.read_size(data, pos + id_len)
        end = pos + id_len + size_len
        if eid != E.SEGMENT and size != E.UNKNOWN_SIZE:
            end += size
        elif eid == E.CLUSTER:
            while end < len(data):
                child, child_len = E.read_id(data, end)
                if child in E.SEGMENT_CHILDREN or child in E.TOP_LEVEL:
                    break
                child_size, child_size_len = E.read_size(data, end + child_len)
                end += child_len + child_size_len + child_size
        if end > len(data):
            raise E.NeedMoreData
        yield eid, data[pos:end]
        pos = end


def documents(data: bytes) -> list[Document]:
    docs: list[Document] = []
    for eid, raw in walk(data):
        if eid == E.EBML:
            docs.append(Document())
        docs[-1].elements.append((eid, raw))
    return docs


def complete_documents(data: bytes) -> list[Document]:
    """The documents of a cut-short response that arrived whole."""
    docs: list[Document] = []
    try:
        for eid, raw in walk(data):
            if eid == E.EBML:
                docs.append(Document())
            docs[-1].elements.append((eid, raw))
    except E.NeedMoreData:
        pass
    whole = []
    for doc in docs:
        try:
            doc.tag("AWS_KINESISVIDEO_CONTINUATION_TOKEN")
        except (KeyError, E.NeedMoreData, IndexError):
            break
        whole.append(doc)
    return whole


def children(raw: bytes) -> Iterator[tuple[int, bytes]]:
    _, id_len = E.read_id(raw, 0)
    _, size_len = E.read_size(raw, id_len)
    payload = raw[id_len + size_len :]
    pos = 0
    while pos < len(payload):
        eid, id_len = E.read_id(payload, pos)
        size, size_len = E.read_size(payload, pos + id_len)
        yield eid, payload[pos : pos + id_len + size_len + size]
        pos += id_len + size_len + size


def simple_tags(tags_raw: bytes) -> list[tuple[str, str]]:
    pairs = []
    for _, tag in children(tags_raw):
        for simple_id, simple in children(tag):
            if simple_id == E.SIMPLE_TAG:
                values = dict(children(simple))
                name = text(values[E.TAG_NAME])
                pairs.append((name, text(values.get(E.TAG_STRING, b""))))
    return pairs


def text(raw: bytes) -> str:
    """A string element's value ("" for no element)."""
    if not raw:
        return ""
    _, id_len = E.read_id(raw, 0)
    _, size_len = E.read_size(raw, id_len)
    return raw[id_len + size_len :].decode("utf-8", "replace").rstrip("\0")


# -- fixtures and helpers -------------------------------------------------------------


@dataclass
class KvsStream:
    name: str
    arn: str
    session: Any
    emulator: Emulator

    def endpoint(self, api: str = "GET_MEDIA") -> str:
        kvs = self.session.client("kinesisvideo")
        return str(kvs.get_data_endpoint(StreamARN=self.arn, APIName=api)["DataEndpoint"])

    def put(self, chunks: Any, **options: Any) -> list[dict[str, Any]]:
        return put_media(
            self.endpoint("PUT_MEDIA"),
            self.arn,
            chunks,
            region=self.session.region_name,
            credentials=self.session.get_credentials(),
            **options,
        )

    def media(self) -> Any:
        return self.session.client("kinesis-video-media", endpoint_url=self.endpoint())

    def archive(self) -> Any:
        endpoint = self.endpoint("GET_MEDIA_FOR_FRAGMENT_LIST")
        return self.session.client("kinesis-video-archived-media", endpoint_url=endpoint)

    def get_media(self, selector: dict[str, Any]) -> list[Document]:
        response = self.media().get_media(StreamARN=self.arn, StartSelector=selector)
        assert response["ContentType"] == "video/webm"
        return documents(response["Payload"].read())


@pytest.fixture(autouse=True)
def short_idle_timeout(emulator: Emulator) -> Iterator[None]:
    """GetMedia ends 0.2 s after the producer left, so the tests do not wait 1 s each."""
    previous = emulator.options.get_media_idle_timeout
    emulator.options.get_media_idle_timeout = 0.2
    yield
    emulator.options.get_media_idle_timeout = previous


@pytest.fixture
def kvs_stream(aws_session: Any, emulator: Emulator) -> KvsStream:
    name = f"call-{uuid.uuid4().hex[:8]}"
    kvs = aws_session.client("kinesisvideo")
    arn = kvs.create_stream(StreamName=name, DataRetentionInHours=24, MediaType="audio/x-matroska")
    return KvsStream(name, arn["StreamARN"], aws_session, emulator)


@pytest.fixture
def stored(kvs_stream: KvsStream) -> tuple[KvsStream, ProducerStream, list[dict[str, Any]]]:
    """A stream holding 5 Connect-style fragments."""
    produced = connect_stream(5)
    acks = kvs_stream.put(produced.chunks)
    return kvs_stream, produced, acks


def persisted_numbers(acks: list[dict[str, Any]]) -> list[str]:
    return [ack["FragmentNumber"] for ack in acks if ack["EventType"] == "PERSISTED"]


# -- control plane ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "api", ["GET_MEDIA", "PUT_MEDIA", "GET_MEDIA_FOR_FRAGMENT_LIST", "LIST_FRAGMENTS"]
)
def test_data_endpoint_points_at_the_media_endpoint(kvs_stream: KvsStream, api: str) -> None:
    endpoint = kvs_stream.endpoint(api)
    assert endpoint.startswith(kvs_stream.emulator.media_url + "/gen/")


def test_describe_stream_and_unknown_stream_errors(kvs_stream: KvsStream) -> None:
    kvs = kvs_stream.session.client("kinesisvideo")
    info = kvs.describe_stream(StreamName=kvs_stream.name)["StreamInfo"]
    assert info["StreamARN"] == kvs_stream.arn
    with pytest.raises(ClientError) as raised:
        kvs.get_data_endpoint(StreamName="no-such-stream", APIName="GET_MEDIA")
    assert raised.value.response["Error"]["Code"] == "ResourceNotFoundException"


# -- PutMedia -----------------------------------------------------------------------------


def test_put_media_acknowledges_each_fragment_with_increasing_numbers(stored: Any) -> None:
    _, _, acks = stored
    kinds = [ack["EventType"] for ack in acks]
    assert kinds == ["BUFFERING", "RECEIVED", "PERSISTED"] * 5
    numbers = persisted_numbers(acks)
    assert all(re.fullmatch(r"\d{47}", n) for n in numbers)
    assert [int(n) for n in numbers] == sorted({int(n) for n in numbers})
    assert [ack["FragmentTimecode"] for ack in acks[::3]] == [
        START_MS + i * FRAGMENT_MS for i in range(5)
    ]


def test_put_media_rejects_bytes_that_are_not_mkv(kvs_stream: KvsStream) -> None:
    acks = kvs_stream.put([b"\x00\x01garbage"])
    assert acks[-1]["EventType"] == "ERROR"
    assert acks[-1]["ErrorId"] == 4006


def test_put_media_to_unknown_stream_raises_not_found(kvs_stream: KvsStream) -> None:
    endpoint = kvs_stream.endpoint("PUT_MEDIA")
    with pytest.raises(KvsMediaError) as raised:
        put_media(
            endpoint,
            "no-such-stream",
            connect_stream(1).chunks,
            region=kvs_stream.session.region_name,
            credentials=kvs_stream.session.get_credentials(),
        )
    assert (raised.value.status, raised.value.code) == (404, "ResourceNotFoundException")


def test_relative_timecodes_add_the_producer_start(kvs_stream: KvsStream) -> None:
    relative = [stream_header(), E.element(E.CLUSTER, E.uint_element(E.TIMECODE, 1500))]
    kvs_stream.put(relative, timecode_type="RELATIVE", producer_start_ms=1_700_000_000_250)
    (doc,) = kvs_stream.get_media({"StartSelectorType": "EARLIEST"})
    assert doc.tag("AWS_KINESISVIDEO_PRODUCER_TIMESTAMP") == "1700000001.750"


# -- GetMedia -------------------------------------------------------------------------------


def test_get_media_earliest_returns_every_fragment_in_the_kvs_layout(stored: Any) -> None:
    stream, produced, acks = stored
    docs = stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.number for doc in docs] == persisted_numbers(acks)
    assert [doc.cluster for doc in docs] == produced.clusters
    for index, doc in enumerate(docs):
        kinds = [eid for eid, _ in doc.elements]
        assert kinds[:4] == [E.EBML, E.SEGMENT, E.INFO, E.TRACKS]
        assert doc.elements[1][1].endswith(E.encode_size(E.UNKNOWN_SIZE))
        names = [name for name, _ in doc.tags()]
        assert names == [
            *CONNECT_TAG_NAMES,
            "AWS_KINESISVIDEO_FRAGMENT_NUMBER",
            "AWS_KINESISVIDEO_SERVER_TIMESTAMP",
            "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP",
            *CONNECT_TAG_NAMES,
            "TrailingMarker",
            "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW",
            "AWS_KINESISVIDEO_CONTINUATION_TOKEN",
        ]
        tag_kinds = [eid for eid in kinds if eid in (E.TAGS, E.CLUSTER)]
        assert tag_kinds.index(E.CLUSTER) == len(CONNECT_TAG_NAMES) + 1  # one Tags each + AWS
        assert doc.tag("ContactId") == CONTACT_ID
        assert doc.tag("AWS_KINESISVIDEO_CONTINUATION_TOKEN") == doc.number
        assert doc.tag("TrailingMarker") == str(index)
        producer = doc.tag("AWS_KINESISVIDEO_PRODUCER_TIMESTAMP")
        assert re.fullmatch(r"\d{10}\.\d{3}", producer)
        assert round(float(producer) * 1000) == START_MS + index * FRAGMENT_MS
        assert abs(float(doc.tag("AWS_KINESISVIDEO_SERVER_TIMESTAMP")) - time.time()) < 60


def test_tags_between_clusters_of_one_segment_trail_the_earlier_cluster(
    kvs_stream: KvsStream,
) -> None:
    produced = connect_stream(3, segment_per_fragment=False)
    kvs_stream.put(produced.chunks)
    docs = kvs_stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.cluster for doc in docs] == produced.clusters
    markers = [[v for n, v in doc.tags() if n == "TrailingMarker"] for doc in docs]
    assert markers == [["0"], ["1"], ["2"]]
    # Fragment 1's leading tags arrived after Cluster 0, so they trail fragment 0.
    assert docs[1].tags()[0][0] == "AWS_KINESISVIDEO_FRAGMENT_NUMBER"
    assert [n for n, _ in docs[0].tags()].count("ContactId") == 3


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_fragments_split_correctly_whatever_the_http_chunk_boundaries(
    kvs_stream: KvsStream, size: int
) -> None:
    produced = connect_stream(2, unknown_size=size == 7)
    data = b"".join(produced.chunks)
    acks = kvs_stream.put(data[i : i + size] for i in range(0, len(data), size))
    docs = kvs_stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.number for doc in docs] == persisted_numbers(acks)
    assert [doc.cluster for doc in docs] == produced.clusters
    assert docs[1].tag("TrailingMarker") == "1"


def test_unknown_size_clusters_come_back_unchanged(kvs_stream: KvsStream) -> None:
    produced = connect_stream(3, unknown_size=True)
    kvs_stream.put(produced.chunks)
    docs = kvs_stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.cluster for doc in docs] == produced.clusters


def test_fragment_number_selector_starts_after_that_fragment(stored: Any) -> None:
    stream, _, acks = stored
    numbers = persisted_numbers(acks)
    selector = {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": numbers[1]}
    docs = stream.get_media(selector)
    assert [doc.number for doc in docs] == numbers[2:]


def test_inclusive_option_starts_with_that_fragment(stored: Any) -> None:
    stream, _, acks = stored
    numbers = persisted_numbers(acks)
    stream.emulator.options.fragment_selector_inclusive = True
    try:
        selector = {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": numbers[1]}
        docs = stream.get_media(selector)
    finally:
        stream.emulator.options.fragment_selector_inclusive = False
    assert [doc.number for doc in docs] == numbers[1:]


@pytest.mark.parametrize("kind", ["PRODUCER_TIMESTAMP", "SERVER_TIMESTAMP"])
def test_timestamp_selectors_start_at_the_first_fragment_stamped_since(
    stored: Any, kind: str
) -> None:
    stream, _, _ = stored
    everything = stream.get_media({"StartSelectorType": "EARLIEST"})
    tag = f"AWS_KINESISVIDEO_{kind}"
    start = float(everything[3].tag(tag))
    docs = stream.get_media({"StartSelectorType": kind, "StartTimestamp": start})
    expected = [doc.number for doc in everything if float(doc.tag(tag)) >= start]
    assert [doc.number for doc in docs] == expected
    assert everything[3].number in expected


def test_continuation_token_resumes_after_a_cut_without_gap_or_duplicate(stored: Any) -> None:
    stream, _, acks = stored
    stream.emulator.faults.cut_get_media(after_fragments=2, stream=stream.name)
    response = stream.media().get_media(
        StreamARN=stream.arn, StartSelector={"StartSelectorType": "EARLIEST"}
    )
    received = bytearray()
    with pytest.raises(ResponseStreamingError):
        for chunk in response["Payload"].iter_chunks(256):
            received += chunk
    # A reader loses the bytes of its last, failed read: resume from the last
    # fragment it holds whole.
    first = complete_documents(bytes(received))
    assert 1 <= len(first) <= 2
    token = first[-1].tag("AWS_KINESISVIDEO_CONTINUATION_TOKEN")
    rest = stream.get_media({"StartSelectorType": "CONTINUATION_TOKEN", "ContinuationToken": token})
    assert [doc.number for doc in first + rest] == persisted_numbers(acks)


def test_cut_after_bytes_breaks_the_stream_mid_fragment(stored: Any) -> None:
    stream, _, _ = stored
    remote_faults(stream.emulator.control_url, {"cut_get_media": {"after_bytes": 1000}})
    response = stream.media().get_media(
        StreamARN=stream.arn, StartSelector={"StartSelectorType": "EARLIEST"}
    )
    with pytest.raises(ResponseStreamingError):
        response["Payload"].read()


def test_get_media_errors_carry_the_real_exception_codes(stored: Any) -> None:
    stream, _, _ = stored
    media = stream.media()
    with pytest.raises(ClientError) as missing:
        media.get_media(StreamName="no-such-stream", StartSelector={"StartSelectorType": "NOW"})
    assert missing.value.response["Error"]["Code"] == "ResourceNotFoundException"
    assert missing.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as bad:
        media.get_media(
            StreamARN=stream.arn,
            StartSelector={"StartSelectorType": "CONTINUATION_TOKEN", "ContinuationToken": "x"},
        )
    assert bad.value.response["Error"]["Code"] == "InvalidArgumentException"
    assert bad.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_expired_data_endpoint_is_refused_until_fetched_again(stored: Any) -> None:
    stream, _, _ = stored
    old = stream.media()
    remote_faults(stream.emulator.control_url, {"expire_data_endpoints": True})
    with pytest.raises(ClientError) as expired:
        old.get_media(StreamARN=stream.arn, StartSelector={"StartSelectorType": "EARLIEST"})
    assert expired.value.response["Error"]["Code"] == "InvalidEndpointException"
    assert expired.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert len(stream.get_media({"StartSelectorType": "EARLIEST"})) == 5


def test_get_media_on_an_idle_stream_ends_after_the_idle_timeout(kvs_stream: KvsStream) -> None:
    started = time.monotonic()
    assert kvs_stream.get_media({"StartSelectorType": "NOW"}) == []
    elapsed = time.monotonic() - started
    assert kvs_stream.emulator.options.get_media_idle_timeout <= elapsed < 3


# -- live streaming ----------------------------------------------------------------------------


def paced(chunks: list[bytes], delay: float, log: list[tuple[str, float]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield chunk
        time.sleep(delay)
    log.append(("producer-done", time.monotonic()))


def test_live_get_media_delivers_fragments_while_the_producer_is_sending(
    kvs_stream: KvsStream,
) -> None:
    produced = connect_stream(6)
    log: list[tuple[str, float]] = []
    producer = threading.Thread(
        target=kvs_stream.put, args=(paced(produced.chunks, 0.06, log),), daemon=True
    )
    producer.start()
    time.sleep(0.1)  # the producer is connected: GetMedia stays open
    response = kvs_stream.media().get_media(
        StreamARN=kvs_stream.arn, StartSelector={"StartSelectorType": "EARLIEST"}
    )
    received = bytearray()
    for chunk in response["Payload"].iter_chunks(64):
        received += chunk
        if received.count(AWS_TAG) > len([e for e in log if e[0] == "fragment"]):
            log.append(("fragment", time.monotonic()))
    producer.join(5)
    done = next(t for event, t in log if event == "producer-done")
    arrivals = [t for event, t in log if event == "fragment"]
    assert [doc.cluster for doc in documents(bytes(received))] == produced.clusters
    assert len(arrivals) == 6
    assert arrivals[0] < done - 0.3  # the first fragment came long before the producer ended


class LiveReader:
    """Reads a GetMedia response in a thread as bytes arrive (read1), stamping each piece."""

    def __init__(self, stream: KvsStream, selector: dict[str, Any]) -> None:
        response = stream.media().get_media(StreamARN=stream.arn, StartSelector=selector)
        self.raw = response["Payload"]._raw_stream
        self.data = bytearray()
        self.frames: list[tuple[bytes, float]] = []  # (frame data, when it parsed)
        self.broken: Exception | None = None
        self._reader = MkvStreamReader()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while data := self.raw.read1(65536):
                self.data += data
                now = time.monotonic()
                for event in self._reader.feed(data):
                    if isinstance(event, FrameRead):
                        self.frames.append((event.data, now))
        except Exception as e:  # a cut connection
            self.broken = e

    def wait_for(self, needle: bytes, timeout: float = 5.0) -> float:
        """Seconds until `needle` has arrived."""
        started = time.monotonic()
        while needle not in self.data:
            assert time.monotonic() - started < timeout, f"{needle[:16]!r} never arrived"
            time.sleep(0.005)
        return time.monotonic() - started

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()


def test_a_fragment_is_sent_as_soon_as_its_cluster_is_stored(kvs_stream: KvsStream) -> None:
    produced = connect_stream(3)
    gate = [threading.Event() for _ in range(4)]

    def produce() -> Iterator[bytes]:
        for index, chunk in enumerate(produced.chunks):
            if index % 3 == 0:  # each fragment's leading tags wait for the test
                assert gate[index // 3].wait(10)
            yield chunk
        assert gate[3].wait(10)  # and so does the end of the body

    gate[0].set()
    producer = threading.Thread(target=kvs_stream.put, args=(produce(),), daemon=True)
    producer.start()
    time.sleep(0.1)  # connected: GetMedia stays open
    reader = LiveReader(kvs_stream, {"StartSelectorType": "EARLIEST"})
    for index in range(3):
        # The producer is held before the next fragment: nothing else can release this one.
        assert reader.wait_for(produced.clusters[index]) < 1.0
        assert reader.data.count(AWS_TAG) == index  # position tags come once it is complete
        gate[index + 1].set()
    producer.join(10)
    reader.join()
    assert [doc.cluster for doc in documents(bytes(reader.data))] == produced.clusters


def test_blocks_of_an_unknown_size_cluster_are_sent_as_they_are_put(
    kvs_stream: KvsStream,
) -> None:
    produced = connect_stream(1, unknown_size=True)
    cluster = produced.clusters[0]
    blocks = list(walk_cluster_children(cluster))
    put_at: list[float] = []

    def produce() -> Iterator[bytes]:
        yield produced.chunks[0]
        yield cluster[: blocks[0][0]]  # header, Timecode, Position
        for start, end in blocks:
            time.sleep(0.1)
            put_at.append(time.monotonic())
            yield cluster[start:end]
        yield produced.chunks[2]

    producer = threading.Thread(target=kvs_stream.put, args=(produce(),), daemon=True)
    producer.start()
    time.sleep(0.05)
    reader = LiveReader(kvs_stream, {"StartSelectorType": "EARLIEST"})
    producer.join(10)
    reader.join()
    assert len(reader.frames) == len(blocks) == 8
    latencies = [seen - put for (_, seen), put in zip(reader.frames, put_at, strict=True)]
    assert max(latencies) < 0.09, latencies  # each block before the producer's next one
    assert [doc.cluster for doc in documents(bytes(reader.data))] == produced.clusters


def walk_cluster_children(cluster: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each SimpleBlock in a Cluster's bytes."""
    _, id_len = E.read_id(cluster, 0)
    _, size_len = E.read_size(cluster, id_len)
    pos = id_len + size_len
    while pos < len(cluster):
        eid, child_id_len = E.read_id(cluster, pos)
        size, child_size_len = E.read_size(cluster, pos + child_id_len)
        end = pos + child_id_len + child_size_len + size
        if eid == E.SIMPLE_BLOCK:
            yield pos, end
        pos = end


def test_a_fragment_the_producer_breaks_off_cuts_its_readers_and_is_not_kept(
    kvs_stream: KvsStream,
) -> None:
    produced = connect_stream(2)
    half = len(produced.clusters[1]) // 2
    held = threading.Event()

    def produce() -> Iterator[bytes]:
        yield from produced.chunks[:3]
        yield produced.chunks[3]
        yield produced.clusters[1][:half]
        held.wait(10)

    acks: list[dict[str, Any]] = []
    producer = threading.Thread(target=lambda: acks.extend(kvs_stream.put(produce())), daemon=True)
    producer.start()
    time.sleep(0.1)
    reader = LiveReader(kvs_stream, {"StartSelectorType": "EARLIEST"})
    reader.wait_for(produced.clusters[1][half - 64 : half])  # half of fragment 2 was sent live
    held.set()  # the body ends inside the Cluster: an ERROR ack, the fragment is dropped
    producer.join(10)
    reader.join()
    assert reader.broken is not None
    assert [ack["EventType"] for ack in acks][-1] == "ERROR"
    kept = kvs_stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.cluster for doc in kept] == produced.clusters[:1]


def test_now_starts_with_the_next_fragment_to_arrive(kvs_stream: KvsStream) -> None:
    produced = connect_stream(6)
    persisted = threading.Event()
    acks: list[dict[str, Any]] = []

    def on_ack(ack: dict[str, Any]) -> None:
        acks.append(ack)
        if len(persisted_numbers(acks)) == 2:
            persisted.set()

    def produce() -> Iterator[bytes]:
        for index, chunk in enumerate(produced.chunks):
            if index == 7:  # fragment 3's leading tags: wait for the reader to connect
                time.sleep(0.3)
            yield chunk

    producer = threading.Thread(
        target=kvs_stream.put, args=(produce(),), kwargs={"on_ack": on_ack}, daemon=True
    )
    producer.start()
    assert persisted.wait(5)
    docs = kvs_stream.get_media({"StartSelectorType": "NOW"})
    producer.join(5)
    assert [doc.number for doc in docs] == persisted_numbers(acks)[2:]
    assert [doc.cluster for doc in docs] == produced.clusters[2:]


# -- archived media -----------------------------------------------------------------------------


def test_list_fragments_and_get_media_for_fragment_list(stored: Any) -> None:
    stream, produced, acks = stored
    numbers = persisted_numbers(acks)
    archive = stream.archive()
    listed = archive.list_fragments(StreamARN=stream.arn)["Fragments"]
    assert [f["FragmentNumber"] for f in listed] == numbers
    assert listed[0]["FragmentLengthInMilliseconds"] == FRAGMENT_MS
    window = {
        "StartTimestamp": listed[1]["ProducerTimestamp"],
        "EndTimestamp": listed[3]["ProducerTimestamp"],
    }
    ranged = archive.list_fragments(
        StreamName=stream.name,
        FragmentSelector={"FragmentSelectorType": "PRODUCER_TIMESTAMP", "TimestampRange": window},
    )["Fragments"]
    assert [f["FragmentNumber"] for f in ranged] == numbers[1:4]
    wanted = [numbers[3], numbers[0]]
    response = archive.get_media_for_fragment_list(StreamName=stream.name, Fragments=wanted)
    docs = documents(response["Payload"].read())
    assert [doc.number for doc in docs] == wanted
    assert [doc.cluster for doc in docs] == [produced.clusters[3], produced.clusters[0]]


def test_fragment_list_with_an_unknown_number_is_not_found(stored: Any) -> None:
    stream, _, _ = stored
    with pytest.raises(ClientError) as raised:
        stream.archive().get_media_for_fragment_list(StreamName=stream.name, Fragments=["1" * 47])
    assert raised.value.response["Error"]["Code"] == "ResourceNotFoundException"


# -- real KVS outputs fed back in as producer streams -------------------------------------------


def fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.mkv")) if FIXTURES.is_dir() else []


@pytest.mark.skipif(not fixture_files(), reason=f"no KVS fixtures in {FIXTURES}")
@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: p.name)
def test_real_kvs_streams_survive_put_and_get_media(aws_session: Any, path: Path) -> None:
    data = path.read_bytes()
    every = [raw for eid, raw in walk_tolerant(data) if eid == E.CLUSTER]
    complete = walk_clusters_complete(data)
    kvs = aws_session.client("kinesisvideo")
    name = f"fixture-{uuid.uuid4().hex[:8]}"
    arn = kvs.create_stream(StreamName=name)["StreamARN"]
    stream = KvsStream(name, arn, aws_session, None)  # type: ignore[arg-type]
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    acks = stream.put(chunks, timecode_type="RELATIVE")
    docs = stream.get_media({"StartSelectorType": "EARLIEST"})
    assert [doc.cluster for doc in docs] == complete
    errors = [ack for ack in acks if ack["EventType"] == "ERROR"]
    assert len(errors) == (len(complete) < len(every))  # a cut-short last Cluster
    assert len(persisted_numbers(acks)) == len(complete)
    for doc in docs:
        names = [n for n, _ in doc.tags()]
        assert names.count("AWS_KINESISVIDEO_FRAGMENT_NUMBER") == 1


def walk_tolerant(data: bytes) -> list[tuple[int, bytes]]:
    """walk(), keeping a last element that the file cuts short."""
    found: list[tuple[int, bytes]] = []
    pos = 0
    try:
        for eid, raw in walk(data):
            found.append((eid, raw))
            pos += len(raw)
    except E.NeedMoreData:
        found.append((E.read_id(data, pos)[0], data[pos:]))
    return found


def walk_clusters_complete(data: bytes) -> list[bytes]:
    """Clusters whose bytes are all in the file (the last one may be cut short)."""
    clusters = []
    for eid, raw in walk_tolerant(data):
        if eid != E.CLUSTER:
            continue
        _, id_len = E.read_id(raw, 0)
        size, size_len = E.read_size(raw, id_len)
        if size == E.UNKNOWN_SIZE or id_len + size_len + size == len(raw):
            clusters.append(raw)
    return clusters
