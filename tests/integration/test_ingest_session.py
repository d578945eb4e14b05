"""CallSession against the embedded emulator: every way a KVS stream misbehaves.

Each test puts a Connect-layout call into KVS with PutMedia, runs one
`CallSession` in this process with a sink that collects what it publishes,
and checks the exact PCM per track (no loss, no duplicate) and the end reason.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pytest

from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream.mkv.writer import ConnectCallWriter
from callstream_emulator.emulator import Emulator
from callstream_emulator.kvs_producer import put_media
from services.ingest.media import KvsMedia
from services.ingest.session import CallSession

FRAGMENT = 16384  # PCM bytes per track in one Connect fragment (1.024 s)


@dataclass
class CollectingSink:
    """EventSink that keeps what is published; `on_publish` may inject faults."""

    stream: str = "audio"
    events: list[Event] = field(default_factory=list)
    on_publish: Any = None

    def publish(self, events: Any) -> None:
        self.events.extend(events)
        if self.on_publish is not None:
            self.on_publish(self)

    def pcm(self, track: Track) -> bytes:
        chunks = [e for e in self.events if isinstance(e, AudioChunkCaptured) and e.track is track]
        assert [c.sequence for c in chunks] == list(range(len(chunks)))
        offsets = [c.sample_offset for c in chunks]
        assert offsets == sorted(offsets)
        return b"".join(c.pcm for c in chunks)

    def chunk_count(self) -> int:
        return sum(isinstance(e, AudioChunkCaptured) for e in self.events)


def pcm(seconds: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(seconds * 16000))


@dataclass
class Producer:
    """One KVS stream and the calls put into it."""

    session: Any
    emulator: Emulator
    name: str = field(default_factory=lambda: f"call-{uuid.uuid4().hex[:8]}")
    arn: str = ""
    acks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        kvs = self.session.client("kinesisvideo")
        self.arn = kvs.create_stream(StreamName=self.name, DataRetentionInHours=24)["StreamARN"]

    def put(self, chunks: Any) -> list[str]:
        kvs = self.session.client("kinesisvideo")
        endpoint = kvs.get_data_endpoint(StreamARN=self.arn, APIName="PUT_MEDIA")
        acks = put_media(
            endpoint["DataEndpoint"],
            self.arn,
            chunks,
            region=self.session.region_name,
            credentials=self.session.get_credentials(),
        )
        self.acks += acks
        return [a["FragmentNumber"] for a in acks if a["EventType"] == "PERSISTED"]


def call_chunks(
    contact: str, customer: bytes, agent: bytes, start_ms: int, hold: threading.Event | None = None
) -> Iterator[bytes]:
    """A PutMedia body; with `hold`, the producer stays connected until it is set."""
    writer = ConnectCallWriter(contact, "instance", start_ms)
    yield writer.producer_header()
    for offset in range(0, len(customer), FRAGMENT):
        yield writer.producer_fragment(
            customer[offset : offset + FRAGMENT], agent[offset : offset + FRAGMENT]
        )
    if hold is not None:
        hold.wait(30)


def started(contact: str, stream: str, first: str | None) -> CallStarted:
    return CallStarted(
        contact_id=contact, stream_arn=stream, requested_at_ms=0, start_fragment_number=first
    )


@pytest.fixture(autouse=True)
def short_get_media_idle(emulator: Emulator) -> Iterator[None]:
    previous = emulator.options.get_media_idle_timeout
    emulator.options.get_media_idle_timeout = 0.3
    yield
    emulator.options.get_media_idle_timeout = previous


@pytest.fixture
def producer(aws_session: Any, emulator: Emulator) -> Producer:
    return Producer(aws_session, emulator)


def run_session(call: CallStarted, sink: CollectingSink, **options: Any) -> CallEnded:
    media = KvsMedia(
        "us-east-1",
        read_timeout_s=options.pop("read_timeout_s", 5.0),
        endpoint_ttl_s=options.pop("endpoint_ttl_s", 2400.0),
    )
    session = CallSession(call, media, sink, 128, retry_delay_s=0.01, **options)
    return session.run()


def stored_call(producer: Producer, seconds: float = 6.0) -> tuple[str, bytes, bytes, str]:
    contact = str(uuid.uuid4())
    customer, agent = pcm(seconds, 1), pcm(seconds, 2)
    numbers = producer.put(call_chunks(contact, customer, agent, int(time.time() * 1000)))
    return contact, customer, agent, numbers[0]


def test_undisturbed_call_publishes_exactly_its_pcm(producer: Producer) -> None:
    contact, customer, agent, first = stored_call(producer)
    sink = CollectingSink()
    ended = run_session(started(contact, producer.arn, first), sink)
    assert ended.reason is EndReason.END_OF_STREAM
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects == 0 and ended.stream_errors == 0


@pytest.mark.parametrize("after_bytes", [700, 20_000, 33_000, 51_111])
def test_get_media_cut_mid_fragment_resumes_without_gap_or_duplicate(
    producer: Producer, emulator: Emulator, after_bytes: int
) -> None:
    contact, customer, agent, first = stored_call(producer)
    emulator.faults.cut_get_media(after_bytes=after_bytes, stream=producer.name, connections=4)
    sink = CollectingSink()
    ended = run_session(started(contact, producer.arn, first), sink)
    assert ended.reason is EndReason.END_OF_STREAM
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects == 4
    assert all(e.gap_before_ms == 0 for e in sink.events if isinstance(e, AudioChunkCaptured))


def test_cut_after_whole_fragments_resumes_from_the_continuation_token(
    producer: Producer, emulator: Emulator
) -> None:
    contact, customer, agent, first = stored_call(producer)
    emulator.faults.cut_get_media(after_fragments=2, stream=producer.name, connections=2)
    sink = CollectingSink()
    ended = run_session(started(contact, producer.arn, first), sink)
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects == 2


def test_data_endpoint_is_refreshed_before_it_expires(producer: Producer) -> None:
    contact, customer, agent, first = stored_call(producer)
    sink = CollectingSink()
    ended = run_session(started(contact, producer.arn, first), sink, endpoint_ttl_s=0.0)
    assert ended.reason is EndReason.END_OF_STREAM
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects >= 4  # one per fragment boundary


def test_call_runs_past_a_forced_endpoint_expiry(producer: Producer, emulator: Emulator) -> None:
    contact, customer, agent, first = stored_call(producer)
    emulator.faults.cut_get_media(after_bytes=60_000, stream=producer.name)
    done: list[int] = []

    def expire_once(sink: CollectingSink) -> None:
        # The open connection keeps going; the reconnect after the cut meets a 403.
        if not done and sink.chunk_count() > 0:
            done.append(emulator.faults.expire_data_endpoints())

    sink = CollectingSink(on_publish=expire_once)
    ended = run_session(started(contact, producer.arn, first), sink)
    assert done, "the fault was never injected"
    assert ended.reason is EndReason.END_OF_STREAM
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects >= 1


def test_contact_change_mid_stream_ends_the_first_call(producer: Producer) -> None:
    first_contact, second_contact = str(uuid.uuid4()), str(uuid.uuid4())
    customer, agent = pcm(3.0, 3), pcm(3.0, 4)
    now = int(time.time() * 1000)
    first = producer.put(call_chunks(first_contact, customer, agent, now))[0]
    producer.put(call_chunks(second_contact, pcm(2.0, 5), pcm(2.0, 6), now + 4000))
    sink = CollectingSink()
    ended = run_session(started(first_contact, producer.arn, first), sink)
    assert ended.reason is EndReason.CONTACT_CHANGED
    assert second_contact in ended.detail
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent


def test_a_quiet_stream_ends_with_idle_timeout(producer: Producer) -> None:
    contact = str(uuid.uuid4())
    customer, agent = pcm(3 * FRAGMENT / 16000, 7), pcm(3 * FRAGMENT / 16000, 8)
    hold = threading.Event()
    numbers: list[str] = []
    body = call_chunks(contact, customer, agent, int(time.time() * 1000), hold)
    putter = threading.Thread(target=lambda: numbers.extend(producer.put(body)), daemon=True)
    putter.start()
    try:
        first = _first_fragment(producer)
        sink = CollectingSink()
        began = time.monotonic()
        ended = run_session(
            started(contact, producer.arn, first), sink, read_timeout_s=0.3, idle_timeout_s=1.0
        )
        assert time.monotonic() - began < 20
    finally:
        hold.set()
        putter.join(30)
    assert ended.reason is EndReason.IDLE_TIMEOUT
    # KVS (and the emulator) streams blocks as they are put: the producer's
    # last fragment is read whole although it stays connected.
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent


def _first_fragment(producer: Producer, timeout: float = 20.0) -> str:
    kvs = producer.session.client("kinesisvideo")
    endpoint = kvs.get_data_endpoint(StreamARN=producer.arn, APIName="LIST_FRAGMENTS")
    archive = producer.session.client(
        "kinesis-video-archived-media", endpoint_url=endpoint["DataEndpoint"]
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fragments = archive.list_fragments(StreamARN=producer.arn).get("Fragments", [])
        if fragments:
            return str(min(int(f["FragmentNumber"]) for f in fragments))
        time.sleep(0.05)
    raise TimeoutError("no fragment stored")


def test_a_stream_that_never_had_audio_for_this_call_ends_idle(producer: Producer) -> None:
    sink = CollectingSink()
    ended = run_session(
        started("c-1", producer.arn, None), sink, read_timeout_s=0.3, idle_timeout_s=0.5
    )
    assert ended.reason in (EndReason.END_OF_STREAM, EndReason.IDLE_TIMEOUT)
    assert sink.chunk_count() == 0


# -- file mode -------------------------------------------------------------------------


def wav_bytes(channels: list[bytes], rate: int = 8000) -> bytes:
    out = BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(len(channels))
        wav.setsampwidth(2)
        wav.setframerate(rate)
        if len(channels) == 1:
            wav.writeframes(channels[0])
        else:
            left, right = channels
            frames = bytearray()
            for i in range(0, len(left), 2):
                frames += left[i : i + 2] + right[i : i + 2]
            wav.writeframes(bytes(frames))
    return out.getvalue()


@pytest.fixture
def bucket(aws_session: Any) -> str:
    name = f"recordings-{uuid.uuid4().hex[:8]}"
    aws_session.client("s3").create_bucket(Bucket=name)
    return name


def run_file(aws_session: Any, bucket: str, key: str, body: bytes | None) -> CollectingSink:
    if body is not None:
        aws_session.client("s3").put_object(Bucket=bucket, Key=key, Body=body)
    sink = CollectingSink()
    call = CallStarted(contact_id="file-1", stream_arn=f"s3://{bucket}/{key}", requested_at_ms=5000)
    run_session(call, sink)
    return sink


def test_file_mode_mono_wav_is_the_customer_track(aws_session: Any, bucket: str) -> None:
    customer = pcm(9.3, 9)
    sink = run_file(aws_session, bucket, "input/mono.wav", wav_bytes([customer]))
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == b""
    ended = sink.events[-1]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.END_OF_STREAM
    chunks = [e for e in sink.events if isinstance(e, AudioChunkCaptured)]
    assert [c.start_time_ms for c in chunks[:3]] == [5000, 5128, 5256]


def test_file_mode_stereo_wav_maps_left_to_customer_right_to_agent(
    aws_session: Any, bucket: str
) -> None:
    customer, agent = pcm(5.01, 10), pcm(5.01, 11)
    sink = run_file(aws_session, bucket, "input/stereo.wav", wav_bytes([customer, agent]))
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent


def test_file_mode_raw_pcm_is_8khz_mono(aws_session: Any, bucket: str) -> None:
    customer = pcm(3.0, 12)
    sink = run_file(aws_session, bucket, "input/call.raw", customer)
    assert sink.pcm(Track.FROM_CUSTOMER) == customer


def test_file_mode_missing_object_ends_with_error(aws_session: Any, bucket: str) -> None:
    sink = run_file(aws_session, bucket, "input/absent.wav", None)
    ended = sink.events[-1]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.ERROR
    assert "absent.wav" in ended.detail


def test_file_mode_refuses_a_wav_it_would_have_to_resample(aws_session: Any, bucket: str) -> None:
    sink = run_file(aws_session, bucket, "input/16k.wav", wav_bytes([pcm(1.0, 13)], rate=16000))
    ended = sink.events[-1]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.ERROR
    assert "8000 Hz" in ended.detail


# -- backpressure --------------------------------------------------------------------------


def test_kds_throttling_slows_the_call_but_drops_nothing(
    producer: Producer, emulator: Emulator, aws_session: Any
) -> None:
    from callstream.bus.kinesis import KinesisPublisher
    from callstream.contract import default_contract

    kinesis = aws_session.client("kinesis")
    name = f"audio-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)
    contact, customer, agent, first = stored_call(producer, seconds=4.0)
    emulator.faults.throttle_kinesis(
        0.4, seed=11, operations=["PutRecords", "PutRecord"], partial_put_records=True
    )
    emulator.faults.cut_get_media(after_bytes=20_000, stream=producer.name)
    media = KvsMedia("us-east-1")
    ended = CallSession(
        started(contact, producer.arn, first), media, KinesisPublisher(kinesis, name), 128
    ).run()
    emulator.faults.clear()
    shard = kinesis.describe_stream(StreamName=name)["StreamDescription"]["Shards"][0]
    iterator = kinesis.get_shard_iterator(
        StreamName=name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    contract, sink = default_contract(), CollectingSink()
    while iterator:
        page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
        sink.events += [contract.decode(r["Data"]) for r in page["Records"]]
        iterator = page.get("NextShardIterator") if page["Records"] else None
    chunks = [e for e in sink.events if isinstance(e, AudioChunkCaptured)]
    unique = {(c.track, c.sequence): c for c in chunks}  # a retried batch may repeat a record
    sink.events = sorted(unique.values(), key=lambda c: (c.track, c.sequence))
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects == 1
