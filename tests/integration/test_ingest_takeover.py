"""Ingest takeover against the emulator: a call stopped or killed mid-way, resumed elsewhere.

Each test stores a Connect-layout call in KVS, runs it through an
`IngestHandler` (worker "a") whose audio sink can stop or "kill" it at a
chosen publish (storing all, none, a prefix, or all but the first records of
that batch: a hole before a stored record), then hands the same CallStarted
to a second handler (worker "b") sharing the progress table (DynamoDB) and
the audio stream (Kinesis). The audio stream is then read back and must
hold, per track, every chunk sequence 0..n-1 exactly once (none repeated,
none missing) with the PCM of an undisturbed run, one CallStarted and one
CallEnded.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from callstream.bus.kinesis import KinesisPublisher
from callstream.contract import default_contract
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, Event, Track
from callstream.mkv.writer import ConnectCallWriter
from callstream.progress import DynamoProgress
from callstream_emulator.emulator import Emulator
from callstream_emulator.kvs_producer import put_media
from services.ingest.handler import IngestHandler
from services.ingest.media import KvsMedia
from services.ingest.published import PublishedEvents
from services.ingest.settings import IngestSettings
from services.ingest.takeover import Outcome

pytestmark = pytest.mark.integration
FRAGMENT = 16384  # PCM bytes per track in one Connect fragment (1.024 s)
LEASE_MS = 1500


class Killed(BaseException):
    """The instance died here: nothing after it runs (no save, no release)."""


@dataclass
class Audio:
    """The audio stream, and a sink on it that can stop or kill its session at a publish."""

    kinesis: Any
    name: str
    publishes: int = 0
    on_publish: Callable[[Audio, Sequence[Event]], None] | None = None
    stream: str = ""
    publisher: KinesisPublisher = field(init=False)

    def __post_init__(self) -> None:
        self.stream = self.name
        self.publisher = KinesisPublisher(self.kinesis, self.name)

    def publish(self, events: Sequence[Event]) -> None:
        self.publishes += 1
        hook = self.on_publish
        if hook is not None:
            hook(self, events)
        else:
            self.publisher.publish(events)

    def events(self, contact: str) -> list[Event]:
        contract, out = default_contract(), []
        shards = self.kinesis.list_shards(StreamName=self.name)["Shards"]
        for shard in shards:
            iterator = self.kinesis.get_shard_iterator(
                StreamName=self.name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while iterator:
                page = self.kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                out += [contract.decode(r["Data"]) for r in page["Records"]]
                iterator = page.get("NextShardIterator") if page["Records"] else None
        return [e for e in out if getattr(e, "contact_id", None) == contact]


@dataclass
class Stored:
    contact: str
    customer: bytes
    agent: bytes
    call: CallStarted


def pcm(seconds: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(seconds * 16000))


@pytest.fixture
def names() -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    return {"audio": f"audio-{tag}", "progress": f"progress-{tag}"}


@pytest.fixture
def audio(aws_session: Any, names: dict[str, str]) -> Audio:
    kinesis = aws_session.client("kinesis")
    kinesis.create_stream(StreamName=names["audio"], ShardCount=2)
    kinesis.get_waiter("stream_exists").wait(StreamName=names["audio"])
    return Audio(kinesis, names["audio"])


@pytest.fixture
def progress(aws_session: Any, names: dict[str, str]) -> DynamoProgress:
    return DynamoProgress(aws_session.client("dynamodb"), names["progress"], "ingest")


@pytest.fixture(autouse=True)
def short_get_media_idle(emulator: Emulator) -> Iterator[None]:
    previous = emulator.options.get_media_idle_timeout
    emulator.options.get_media_idle_timeout = 0.3
    yield
    emulator.options.get_media_idle_timeout = previous


@pytest.fixture
def stored(aws_session: Any) -> Stored:
    kvs = aws_session.client("kinesisvideo")
    name = f"call-{uuid.uuid4().hex[:8]}"
    arn = kvs.create_stream(StreamName=name, DataRetentionInHours=24)["StreamARN"]
    contact = str(uuid.uuid4())
    customer, agent = pcm(6.0, 1), pcm(6.0, 2)
    writer = ConnectCallWriter(contact, "instance", int(time.time() * 1000))

    def body() -> Iterator[bytes]:
        yield writer.producer_header()
        for offset in range(0, len(customer), FRAGMENT):
            yield writer.producer_fragment(
                customer[offset : offset + FRAGMENT], agent[offset : offset + FRAGMENT]
            )

    endpoint = kvs.get_data_endpoint(StreamARN=arn, APIName="PUT_MEDIA")["DataEndpoint"]
    acks = put_media(
        endpoint,
        arn,
        body(),
        region=aws_session.region_name,
        credentials=aws_session.get_credentials(),
    )
    first = next(a["FragmentNumber"] for a in acks if a["EventType"] == "PERSISTED")
    return Stored(
        contact, customer, agent, CallStarted(contact, arn, 0, start_fragment_number=first)
    )


def handler(
    emulator: Emulator, names: dict[str, str], worker: str, audio: Audio, progress: DynamoProgress
) -> IngestHandler:
    env = {
        **emulator.env(),
        "CALLSTREAM_WORKER_ID": worker,
        "CALLSTREAM_AUDIO_STREAM": names["audio"],
        "CALLSTREAM_PROGRESS_TABLE": names["progress"],
        "CALLSTREAM_IDLE_TIMEOUT_S": "5",
    }
    return IngestHandler(
        IngestSettings.from_env(env),
        progress=progress,
        lease=LEASE_MS,
        media=KvsMedia("us-east-1", read_timeout_s=2.0),
        audio=audio,
        published=PublishedEvents(audio.kinesis, names["audio"]),
    )


def settle(ingest: IngestHandler, contact: str, timeout_s: float = 60) -> float:
    """Tick until the call is settled; the seconds it took."""
    began = time.monotonic()
    while not ingest.is_settled(contact):
        assert time.monotonic() - began < timeout_s, "call not settled"
        ingest.tick()
        time.sleep(0.05)
    return time.monotonic() - began


def wait_done(ingest: IngestHandler, contact: str, timeout_s: float = 60) -> None:
    call = ingest.calls.get(contact)
    future = call.future if call is not None else None
    if future is None:
        return
    future.exception(timeout_s)  # waits; a Killed run ends with that exception


def assert_exactly_once(audio: Audio, stored: Stored) -> None:
    events = audio.events(stored.contact)
    chunks = [e for e in events if isinstance(e, AudioChunkCaptured)]
    for track, expected in (
        (Track.FROM_CUSTOMER, stored.customer),
        (Track.TO_CUSTOMER, stored.agent),
    ):
        mine = sorted((c for c in chunks if c.track is track), key=lambda c: c.sequence)
        sequences = [c.sequence for c in mine]
        repeated = sorted({s for s in sequences if sequences.count(s) > 1})
        assert not repeated, f"{track}: sequences {repeated} published twice"
        assert sequences == list(range(len(mine))), f"{track}: sequences missing"
        assert b"".join(c.pcm for c in mine) == expected
        assert [c.sample_offset for c in mine] == sorted(c.sample_offset for c in mine)
    assert sum(isinstance(e, CallStarted) for e in events) == 1
    ended = [e for e in events if isinstance(e, CallEnded)]
    assert len(ended) == 1
    counts = ended[0].chunk_counts
    assert counts == {t.value: sum(c.track is t for c in chunks) for t in Track}


def kill_at(publish: int, part: str = "all") -> Callable[[Audio, Sequence[Event]], None]:
    """A hook that dies at the given publish, after storing all, none, half or some of its records.

    "hole": the first record lost, the rest stored (a PutRecords batch cut by the kill while
    its failed records were retried); "hole-two": the first two lost.
    """

    def hook(audio: Audio, events: Sequence[Event]) -> None:
        if audio.publishes < publish:
            audio.publisher.publish(events)
            return
        audio.on_publish = None  # the next instance publishes normally
        if part == "all":
            audio.publisher.publish(events)
        elif part == "half":
            audio.publisher.publish(events[: len(events) // 2])
        elif part.startswith("hole"):
            lost = 2 if part == "hole-two" else 1
            assert len(events) > lost, "a hole needs a later record stored"
            audio.publisher.publish(events[lost:])
        raise Killed(f"killed at publish {publish} ({part})")

    return hook


def test_undisturbed_call_saves_progress_and_ends_released(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
) -> None:
    a = handler(emulator, names, "a", audio, progress)
    a.handle(stored.call, None)  # type: ignore[arg-type]
    settle(a, stored.contact)
    assert_exactly_once(audio, stored)
    state = progress.load(stored.contact)
    assert state is not None and state["ended"] is True and state["started"] is True
    claim = progress.claim(stored.contact, "someone", LEASE_MS)
    assert claim.granted and not claim.unreleased  # released at the end
    assert claim.version >= 7  # CallStarted, 6 fragments, CallEnded


@pytest.mark.parametrize(
    ("publish", "part"),
    [
        (1, "all"),
        (2, "all"),
        (4, "all"),
        (7, "half"),
        (9, "none"),
        (12, "half"),
        (5, "hole"),
        (10, "hole-two"),
    ],
    ids=[
        "after-call-started",
        "after-first-chunks",
        "mid-call",
        "half-a-batch",
        "lost-batch",
        "late-half",
        "hole-in-a-batch",
        "two-lost-before-a-stored-one",
    ],
)
def test_killed_between_publish_and_save_resumes_without_gap_or_repeat(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
    publish: int,
    part: str,
) -> None:
    audio.on_publish = kill_at(publish, part)
    a = handler(emulator, names, "a", audio, progress)
    a.handle(stored.call, None)  # type: ignore[arg-type]
    wait_done(a, stored.contact)
    assert not a.is_settled(stored.contact)
    b = handler(emulator, names, "b", audio, progress)
    b.handle(stored.call, None)  # type: ignore[arg-type]
    took = settle(b, stored.contact)
    print(f"killed at publish {publish} ({part}); resumed and ended in {took:.2f} s")
    assert_exactly_once(audio, stored)


@pytest.mark.parametrize("after_publishes", [3, 8])
def test_a_stopped_session_saves_releases_and_another_instance_resumes_at_once(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
    after_publishes: int,
) -> None:
    a = handler(emulator, names, "a", audio, progress)

    def lose_the_shard(sink: Audio, events: Sequence[Event]) -> None:
        sink.publisher.publish(events)
        if sink.publishes == after_publishes:
            a.forget([stored.contact])

    audio.on_publish = lose_the_shard
    a.handle(stored.call, None)  # type: ignore[arg-type]
    running = a.calls[stored.contact]
    assert running.future is not None
    assert running.future.result(60) is Outcome.STOPPED
    assert stored.contact not in a.calls
    audio.on_publish = None
    state = progress.load(stored.contact)
    assert state is not None and not state["ended"]
    assert audio.publishes == after_publishes  # nothing published once stopped
    b = handler(emulator, names, "b", audio, progress)
    b.handle(stored.call, None)  # type: ignore[arg-type]
    took = settle(b, stored.contact)
    assert took < LEASE_MS / 1000 + 5  # released: no wait for a lease to expire
    assert_exactly_once(audio, stored)


def test_a_call_held_by_a_live_instance_waits_for_it(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
) -> None:
    assert progress.claim(stored.contact, "x", LEASE_MS).granted
    b = handler(emulator, names, "b", audio, progress)
    b.handle(stored.call, None)  # type: ignore[arg-type]
    deadline = time.monotonic() + 3 * LEASE_MS / 1000
    while time.monotonic() < deadline:  # x stays alive: b must not run the call
        assert progress.heartbeat(stored.contact, "x")
        b.tick()
        assert not b.is_settled(stored.contact)
        time.sleep(LEASE_MS / 4000)
    assert audio.events(stored.contact) == []
    assert progress.release(stored.contact, "x")
    settle(b, stored.contact)
    assert_exactly_once(audio, stored)


def test_an_ended_call_is_settled_at_once_without_reading_kvs(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
) -> None:
    a = handler(emulator, names, "a", audio, progress)
    a.handle(stored.call, None)  # type: ignore[arg-type]
    settle(a, stored.contact)
    before = len(audio.events(stored.contact))
    b = handler(emulator, names, "b", audio, progress)
    b.media = None  # type: ignore[assignment]  # any KVS read would fail
    b.handle(stored.call, None)  # type: ignore[arg-type]
    assert settle(b, stored.contact, 10) < 5
    assert len(audio.events(stored.contact)) == before
    assert_exactly_once(audio, stored)


def test_killed_after_call_ended_published_is_not_run_again(
    emulator: Emulator,
    names: dict[str, str],
    audio: Audio,
    progress: DynamoProgress,
    stored: Stored,
) -> None:
    def die_after_call_ended(sink: Audio, events: Sequence[Event]) -> None:
        sink.publisher.publish(events)
        if any(isinstance(e, CallEnded) for e in events):
            sink.on_publish = None
            raise Killed("after CallEnded, before the last save")

    audio.on_publish = die_after_call_ended
    a = handler(emulator, names, "a", audio, progress)
    a.handle(stored.call, None)  # type: ignore[arg-type]
    wait_done(a, stored.contact)
    b = handler(emulator, names, "b", audio, progress)
    b.media = None  # type: ignore[assignment]
    b.handle(stored.call, None)  # type: ignore[arg-type]
    settle(b, stored.contact)
    assert_exactly_once(audio, stored)


def test_read_back_follows_a_contact_from_the_parent_into_its_child_shard(
    aws_session: Any,
) -> None:
    kinesis = aws_session.client("kinesis")
    name = f"audio-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=name)
    publisher = KinesisPublisher(kinesis, name)
    since = int(time.time() * 1000) - 1000

    def chunk(contact: str, sequence: int) -> AudioChunkCaptured:
        return AudioChunkCaptured(contact, Track.FROM_CUSTOMER, sequence, 0, 0, 0, b"\0\0", "1")

    publisher.publish([chunk("mine", 0), chunk("other", 0), chunk("mine", 1)])
    parent = kinesis.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    kinesis.split_shard(StreamName=name, ShardToSplit=parent, NewStartingHashKey=str(2**127))
    publisher.publish([chunk("mine", 2), chunk("other", 1)])
    found = PublishedEvents(kinesis, name).since("mine", since)
    assert [(e.contact_id, e.sequence) for e in found if isinstance(e, AudioChunkCaptured)] == [
        ("mine", 0),
        ("mine", 1),
        ("mine", 2),
    ]
    assert PublishedEvents(kinesis, name).since("mine", int(time.time() * 1000) + 60_000) == []
