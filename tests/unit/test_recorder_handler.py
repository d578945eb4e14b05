"""The recorder handler over the in-memory bus and the S3 double: what lands in S3, and when.

Each test plays calls (AudioChunkCaptured per track, CallEnded) through the
production `RecorderHandler` and `ServiceLoop`, writing to `S3Double` (tests/
unit/test_recorder_s3_double.py) with a small part size (the double's part
floor lowered to match, so the multipart path runs on seconds of audio) and
the in-memory progress twin. The expected WAVs are built here from the PCM
put in, sample by sample.
"""

from __future__ import annotations

import dataclasses
import random
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_recorder_s3_double import S3Double

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record
from callstream.config import BusSettings, Env
from callstream.contract import default_contract
from callstream.errors import ConfigurationFault
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    RecordingStored,
    Track,
)
from callstream.metrics import Metrics
from callstream.progress import MemoryProgress
from callstream.runtime import ServiceLoop
from services.recorder.handler import RECORDINGS_SKIPPED, RecorderHandler
from services.recorder.settings import RecorderSettings
from services.recorder.wav import checksum_b64

BUCKET = "recordings"
PART = 64 * 1024  # 2 s of stereo: the double's part floor is lowered to it
T0 = 1_700_000_000_000
C, A = Track.FROM_CUSTOMER, Track.TO_CUSTOMER


def pcm(seconds: float, seed: int) -> bytes:
    """Noise-like PCM (never silence, so misplaced silence shows)."""
    return random.Random(seed).randbytes(int(seconds * 8000) * 2)


@dataclasses.dataclass
class TrackPlan:
    """One track of a test call: its PCM, when it starts, where KVS lost fragments."""

    track: Track
    audio: bytes
    start_ms: int = 0  # after the call's start
    gaps: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk seq -> ms lost before
    chunk_bytes: int = 2048  # 128 ms

    def chunks(self, contact: str) -> list[AudioChunkCaptured]:
        out, gap_total = [], 0
        for seq, offset in enumerate(range(0, len(self.audio), self.chunk_bytes)):
            gap = self.gaps.get(seq, 0)
            gap_total += gap
            samples = offset // 2
            out.append(
                AudioChunkCaptured(
                    contact_id=contact,
                    track=self.track,
                    sequence=seq,
                    sample_offset=samples,
                    offset_ms=samples // 8,
                    start_time_ms=T0 + self.start_ms + samples // 8 + gap_total,
                    pcm=self.audio[offset : offset + self.chunk_bytes],
                    fragment_number=str(seq // 8),
                    gap_before_ms=gap,
                    gap_total_ms=gap_total,
                )
            )
        return out

    def placed(self) -> bytes:
        """The track in its own timeline: audio at its offset, gaps silent."""
        out = bytearray()
        for chunk in self.chunks("x"):
            at = (chunk.sample_offset + chunk.gap_total_ms * 8) * 2
            out[len(out) :] = bytes(at - len(out))
            out[at : at + len(chunk.pcm)] = chunk.pcm
        return bytes(out)


def call_events(
    contact: str, tracks: list[TrackPlan], counts: dict[str, int] | None = None
) -> list[Event]:
    """CallStarted, the tracks' chunks interleaved by capture time, CallEnded."""
    chunks = sorted(
        (c for plan in tracks for c in plan.chunks(contact)),
        key=lambda c: (c.start_time_ms, c.track.value),
    )
    if counts is None:
        counts = {plan.track.value: len(plan.chunks(contact)) for plan in tracks}
    start = T0 + min((p.start_ms for p in tracks), default=0)
    end = CallEnded(
        contact, EndReason.END_OF_STREAM, 0, chunk_counts=counts, call_start_time_ms=start
    )
    return [CallStarted(contact, "arn", 0), *chunks, end]


def stereo_of(tracks: list[TrackPlan], order: tuple[Track, Track] = (C, A)) -> bytes:
    """The expected stereo PCM: each track shifted by its start, interleaved, left first."""
    origin = min(p.start_ms for p in tracks)
    by_track = {p.track: bytes((p.start_ms - origin) * 16) + p.placed() for p in tracks}
    frames = max(len(v) for v in by_track.values()) // 2
    channels = [by_track.get(t, b"").ljust(frames * 2, b"\0") for t in order]
    out = bytearray(frames * 4)
    for i, channel in enumerate(channels):
        out[i * 2 :: 4] = channel[0::2]
        out[i * 2 + 1 :: 4] = channel[1::2]
    return bytes(out)


def wav(pcm_bytes: bytes, channels: int) -> bytes:
    block = 2 * channels
    return (
        b"RIFF"
        + struct.pack("<I", 36 + len(pcm_bytes))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, 8000, 8000 * block, block, 16)
        + b"data"
        + struct.pack("<I", len(pcm_bytes))
        + pcm_bytes
    )


def settings(tmp_path: Path, **env: str) -> RecorderSettings:
    base = RecorderSettings.from_env(
        {"RECORDINGS_BUCKET_NAME": BUCKET, "CALLSTREAM_SPOOL_DIR": str(tmp_path), **env}
    )
    return dataclasses.replace(base, part_bytes=PART)


@dataclasses.dataclass
class World:
    """What outlives an instance: the streams, S3, the progress table, the checkpoints."""

    audio: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("audio"))
    out: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("recordings"))
    letters: MemoryStream = dataclasses.field(default_factory=lambda: MemoryStream("dead"))
    s3: S3Double = dataclasses.field(default_factory=lambda: S3Double(BUCKET, min_part=PART))
    progress: MemoryProgress = dataclasses.field(default_factory=MemoryProgress)
    checkpoints: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)

    def play(self, events: list[Event]) -> None:
        MemoryPublisher(self.audio).publish(events)

    def announced(self) -> list[RecordingStored]:
        decoded = [default_contract().decode(r.data) for r in self.out.shards[0]]
        return [e for e in decoded if isinstance(e, RecordingStored)]

    def dead_letters(self) -> list[Any]:
        return [default_contract().decode(r.data) for r in self.letters.shards[0]]

    def body(self, key: str) -> bytes:
        return self.s3.objects[key].body


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


WORKERS = [0]  # the pool size the handler gets: set per test by the `workers` fixture


@pytest.fixture(autouse=True, params=[0, 4], ids=["inline", "pool"])
def workers(request: pytest.FixtureRequest) -> Iterator[int]:
    """Every test runs with the steps inside `handle` and on a pool of 4 threads."""
    WORKERS[0] = request.param
    yield request.param
    WORKERS[0] = 0


def instance(
    world: World, config: RecorderSettings, s3: Any = None, progress: Any = None, **kw: Any
) -> tuple[RecorderHandler, ServiceLoop]:
    handler = RecorderHandler(
        config,
        s3 if s3 is not None else world.s3,
        sink=kw.pop("sink", MemoryPublisher(world.out)),
        progress=progress if progress is not None else world.progress,
        upload_workers=WORKERS[0],
        **kw,
    )
    loop = ServiceLoop(
        "recorder",
        kw.get("source") or MemorySource(world.audio, world.checkpoints),
        handler,
        MemoryPublisher(world.letters),
    )
    return handler, loop


def run(
    world: World,
    config: RecorderSettings,
    each: Callable[[RecorderHandler, Record], None] | None = None,
    **kw: Any,
) -> RecorderHandler:
    """One instance from the checkpoint to the end of what is on the stream."""
    handler, loop = instance(world, config, **kw)
    for record in loop.source.poll():
        loop.process([record])
        if each is not None:
            each(handler, record)
        loop.flush()
        loop.checkpoint()
    handler.drain()
    loop.flush()
    loop.checkpoint()
    return handler


@pytest.fixture(autouse=True)
def _no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("callstream.runtime.time.sleep", lambda _s: None)


# --- stereo ---------------------------------------------------------------------------


def test_a_short_call_is_one_stereo_wav_customer_left_agent_right(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(1.5, 1)), TrackPlan(A, pcm(1.5, 2))]
    world.play(call_events("c1", tracks))
    run(world, settings(tmp_path))
    (key,) = world.s3.objects
    assert key == "recordings/c1_2023-11-14T22:13:20.000Z.wav"
    body = world.body(key)
    assert body == wav(stereo_of(tracks), 2)
    assert body[44::4][:100] == tracks[0].audio[0::2][:100]  # left: the customer
    (event,) = world.announced()
    assert (event.s3_uri, event.format, event.channels) == (f"s3://{BUCKET}/{key}", "stereo", 2)
    assert event.channel_tracks == (C, A)
    assert (event.byte_count, event.duration_ms) == (len(body), 1500)
    assert event.checksum == checksum_b64(zlib.crc32(body)) == world.s3.objects[key].checksum
    assert world.s3.uploads == {} and world.dead_letters() == []


def test_a_late_track_and_kvs_gaps_are_silence_exactly_where_they_were(tmp_path: Path) -> None:
    world = World()
    tracks = [
        TrackPlan(C, pcm(3, 1), gaps={5: 512, 12: 1000}),
        TrackPlan(A, pcm(2, 2), start_ms=1024, gaps={3: 256}),
    ]
    world.play(call_events("c2", tracks))
    run(world, settings(tmp_path))
    (key,) = world.s3.objects
    pcm_out = world.body(key)[44:]
    assert pcm_out == stereo_of(tracks)
    right = pcm_out[2::4] + b""  # first byte of each right sample
    assert set(right[: 1024 * 8]) == {0}  # the agent starts 1024 ms late
    left_gap = (5 * 1024 + 0) * 2  # customer: 512 ms missing before chunk 5 (sample 5120)
    left = bytes(b for i, b in enumerate(pcm_out) if i % 4 < 2)
    assert set(left[left_gap : left_gap + 512 * 16]) == {0}


def test_the_channel_order_can_put_the_agent_left(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(1, 1)), TrackPlan(A, pcm(1, 2))]
    world.play(call_events("c3", tracks))
    run(world, settings(tmp_path, RECORDINGS_CHANNEL_ORDER="agent,customer"))
    (key,) = world.s3.objects
    assert world.body(key)[44:] == stereo_of(tracks, order=(A, C))
    assert world.announced()[0].channel_tracks == (A, C)


def test_one_silent_side_is_silence_on_its_channel(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(1, 1))]
    world.play(call_events("c4", tracks, counts={C.value: 8, A.value: 0}))
    run(world, settings(tmp_path))
    (key,) = world.s3.objects
    body = world.body(key)[44:]
    assert body[0::4] == tracks[0].audio[0::2] and set(body[2::4]) == {0}


def test_a_call_without_audio_stores_nothing_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World()
    metrics = Metrics("recorder", "off")
    world.play(
        [
            CallStarted("c5", "arn", 0),
            CallEnded("c5", EndReason.NO_AUDIO_TRACK, 0, chunk_counts={}),
        ]
    )
    handler = run(world, settings(tmp_path), metrics=metrics)
    assert world.s3.objects == {} and world.s3.calls == [] and world.announced() == []
    assert metrics.value(RECORDINGS_SKIPPED, reason="NO_AUDIO_TRACK") == 1
    assert "no recording stored: no audio (CallEnded NO_AUDIO_TRACK" in caplog.text
    assert handler.is_settled("c5") and world.dead_letters() == []


# --- per-track and both ---------------------------------------------------------------


def test_per_track_wavs_are_the_reference_layout_byte_for_byte(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(2, 1), gaps={4: 300}), TrackPlan(A, pcm(1, 2), start_ms=500)]
    world.play(call_events("c6", tracks))
    run(world, settings(tmp_path, RECORDINGS_FORMAT="per-track"))
    stamp = "2023-11-14T22:13:20.000Z"
    for plan in tracks:
        key = f"recordings/c6_{stamp}_{plan.track.value}.wav"
        assert world.body(key) == wav(plan.placed(), 1)
        head = world.s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ContentType"] == "audio/wav"
        assert head["Metadata"]["contact-id"] == "c6"
        assert head["Metadata"]["track"] == plan.track.value
    assert sorted(e.format for e in world.announced()) == ["per-track", "per-track"]


def test_both_stores_the_stereo_wav_and_one_per_track(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(5, 1)), TrackPlan(A, pcm(5, 2))]
    world.play(call_events("c7", tracks))
    run(world, settings(tmp_path, RECORDINGS_FORMAT="both"))
    assert len(world.s3.objects) == 3 and len(world.announced()) == 3
    stereo = next(e for e in world.announced() if e.format == "stereo")
    assert world.body(stereo.key)[44:] == stereo_of(tracks)


# --- streamed -------------------------------------------------------------------------


def test_a_long_call_is_uploaded_in_parts_while_it_runs(tmp_path: Path) -> None:
    world = World()
    world.s3.kms["alias/recordings"] = "Enabled"
    tracks = [TrackPlan(C, pcm(9, 1)), TrackPlan(A, pcm(9, 2), start_ms=300)]
    events = call_events("c8", tracks)
    world.play(events[:-1])  # the call is still going
    run(world, settings(tmp_path, RECORDINGS_KMS_KEY_ID="alias/recordings"))
    (upload,) = world.s3.uploads.values()
    assert sorted(upload.parts) == [2, 3, 4]  # part 1 (with the header) comes last
    assert all(len(body) == PART for body, _ in upload.parts.values())
    (head_key,) = world.s3.objects
    assert head_key.startswith("recordings/.incomplete/c8_")
    assert len(world.body(head_key)) == PART - 44 and world.announced() == []
    world.play(events[-1:])
    run(world, settings(tmp_path, RECORDINGS_KMS_KEY_ID="alias/recordings"))
    (key,) = world.s3.objects  # the head is gone
    stored = world.s3.objects[key]
    assert stored.body == wav(stereo_of(tracks), 2) and stored.parts == 5
    assert (stored.sse, stored.kms_key) == ("aws:kms", "alias/recordings")
    assert stored.tags["duration-ms"] == "9300" and stored.tags["channels"] == "2"
    (event,) = world.announced()
    assert event.checksum == checksum_b64(zlib.crc32(stored.body))
    assert world.s3.uploads == {}


def test_spool_disk_stays_near_one_part_however_long_the_call(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(40, 1)), TrackPlan(A, pcm(40, 2))]
    world.play(call_events("c9", tracks))
    peak = [0]

    def measure(handler: RecorderHandler, _record: Record) -> None:
        peak[0] = max(peak[0], handler.spool.disk_bytes())

    run(world, settings(tmp_path), each=measure)
    assert world.body(next(iter(world.s3.objects)))[44:] == stereo_of(tracks)
    segment = 256 * 1024
    assert peak[0] <= PART + 2 * 2 * segment, peak[0]  # 40 s of stereo is 1.25 MiB


def test_a_takeover_continues_the_upload_and_reads_back_only_what_was_not_stored(
    tmp_path: Path,
) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(12, 1)), TrackPlan(A, pcm(12, 2))]
    events = call_events("c10", tracks)
    world.play(events)
    records = world.audio.shards[0]
    kill_at = len(records) * 2 // 3
    handler, loop = instance(world, settings(tmp_path / "a"))
    for record in loop.source.poll()[:kill_at]:
        loop.process([record])
        handler.drain()  # in this test the kill comes between records, not inside a step
        loop.checkpoint()
    # killed: the next instance starts from the checkpoint and the saved progress
    sequence, inclusive = world.checkpoints["shardId-000000000000"]
    assert inclusive
    reread = len(records) - int(sequence) + 1
    assert reread < len(records) - kill_at + 40  # only chunks not yet in a stored part
    run(world, settings(tmp_path / "b"))
    (key,) = world.s3.objects
    assert world.body(key) == wav(stereo_of(tracks), 2)
    assert len(world.announced()) == 1 and world.s3.uploads == {}


# --- bad input ------------------------------------------------------------------------


def test_a_chunk_beyond_call_endeds_count_aborts_the_upload_and_dead_letters_the_end(
    tmp_path: Path,
) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(6, 1)), TrackPlan(A, pcm(6, 2))]
    counts = {C.value: 40, A.value: 47}  # the customer sent 47
    world.play(call_events("c11", tracks, counts=counts))
    handler = run(world, settings(tmp_path))
    assert world.s3.objects == {} and world.s3.uploads == {}  # head and parts gone
    assert world.announced() == []
    if WORKERS[0] == 0:  # on a pool, the end may come before anything was stored
        assert "AbortMultipartUpload" in world.s3.calls
    (letter,) = world.dead_letters()
    assert "CallEnded counts 40 chunks of AUDIO_FROM_CUSTOMER, but chunk 46 arrived" in (
        letter.reason
    )
    assert isinstance(default_contract().decode(letter.data), CallEnded)
    assert handler.is_settled("c11")
    assert world.checkpoints["shardId-000000000000"][1] is False  # past the whole call


def test_chunks_still_missing_after_the_wait_are_a_dead_letter_not_a_short_wav(
    tmp_path: Path,
) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(6, 1)), TrackPlan(A, pcm(6, 2))]
    events = [e for e in call_events("c12", tracks) if getattr(e, "sequence", -1) != 20]
    world.play(events)
    clock = Clock()
    handler, loop = instance(world, settings(tmp_path), clock=clock)
    loop.process(loop.source.poll())
    handler.drain()
    loop.checkpoint()
    assert not handler.is_settled("c12") and world.dead_letters() == []
    clock.now += 61
    handler.drain()
    loop.flush()
    loop.checkpoint()
    (letter,) = world.dead_letters()
    assert "still missing 60 s after it" in letter.reason
    assert world.s3.objects == {} and world.s3.uploads == {} and world.announced() == []
    assert handler.is_settled("c12")


def test_a_kms_key_the_recorder_may_not_use_stops_it_with_a_clear_error(tmp_path: Path) -> None:
    for state, code in (("Denied", "AccessDenied"), ("Disabled", "KMS.DisabledException")):
        world = World()
        world.s3.kms["alias/recordings"] = state
        world.play(call_events("c13", [TrackPlan(C, pcm(1, 1))]))
        config = settings(tmp_path, RECORDINGS_KMS_KEY_ID="alias/recordings")
        handler, loop = instance(world, config)
        with pytest.raises(ConfigurationFault, match=code):
            loop.run(threading.Event())
        assert world.s3.objects == {} and world.dead_letters() == []
        assert not handler.is_settled("c13")


class FlakyS3:
    """The double, failing the n-th UploadPart once (SlowDown: S3 asks to retry)."""

    def __init__(self, inner: S3Double, fail_on: int) -> None:
        self.inner, self.fail_on, self.count = inner, fail_on, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upload_part(self, **kw: Any) -> Any:
        self.count += 1
        if self.count == self.fail_on:
            from test_recorder_s3_double import client_error

            raise client_error("SlowDown", 503, "UploadPart")
        return self.inner.upload_part(**kw)


def test_an_upload_failing_mid_way_is_retried_and_gives_the_same_object(tmp_path: Path) -> None:
    world = World()
    tracks = [TrackPlan(C, pcm(8, 1)), TrackPlan(A, pcm(8, 2))]
    world.play(call_events("c14", tracks))
    flaky = FlakyS3(world.s3, fail_on=2)
    run(world, settings(tmp_path), s3=flaky)
    assert flaky.count > 2
    (key,) = world.s3.objects
    assert world.body(key) == wav(stereo_of(tracks), 2) and len(world.announced()) == 1


def test_recorder_settings_read_the_new_variables() -> None:
    env = Env({"RECORDINGS_BUCKET_NAME": "b-1", "RECORDINGS_FORMAT": "both"})
    assert BusSettings.from_env(env).audio_stream == "callstream-audio"
    config = RecorderSettings.from_env({"RECORDINGS_BUCKET_NAME": "b-1"})
    assert (config.formats, config.channel_order) == (
        ("stereo",),
        ("AUDIO_FROM_CUSTOMER", "AUDIO_TO_CUSTOMER"),
    )
