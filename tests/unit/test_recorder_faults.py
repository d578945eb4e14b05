"""The recorder fails at every effect and still stores the same objects, announced.

A call long enough to be streamed in parts (RECORDINGS_FORMAT=both: a stereo
WAV and one per track, every one a multipart upload with its head) runs through
the production `RecorderHandler` and `ServiceLoop` over the in-memory bus,
writing to the S3 double (tests/unit/test_recorder_s3_double.py). Every S3
write (PutObject of a head or a WAV, DeleteObject, PutObjectTagging,
CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
AbortMultipartUpload), every progress save, every RecordingStored publish and,
for kills, every checkpoint is failed in turn by the fault-at-every-step
harness (tests/effect_faults.py). Each run must leave the objects of an
undisturbed run byte for byte, no upload or head behind, every recording
announced (a repeat is the same event), no dead letter, the progress done
and the checkpoint past the call. A killed instance's successor starts on an
empty spool: what it did not find stored, it reads again from the stream.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from effect_faults import MODES, Faults, FaultyProgress, FaultySink, FaultySource, until_done
from effect_faults import retried as _retried
from test_recorder_handler import A, C, TrackPlan, World, call_events, pcm, settings, stereo_of, wav

from callstream.bus.memory import MemoryPublisher, MemorySource
from callstream.events import RecordingStored
from callstream.runtime import ServiceLoop
from services.recorder.handler import RecorderHandler

SHARD = "shardId-000000000000"
KINDS = {
    "put_object": "put",
    "delete_object": "put",
    "put_object_tagging": "put",
    "create_multipart_upload": "upload",
    "upload_part": "upload",
    "complete_multipart_upload": "upload",
    "abort_multipart_upload": "upload",
}


class FaultyS3:
    """The S3 double whose writes are effects (reads are not)."""

    def __init__(self, inner: Any, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        kind = KINDS.get(name)
        if kind is None:
            return method
        return lambda **kw: self.faults.effect(kind, lambda: method(**kw))


TRACKS = [TrackPlan(C, pcm(6, 1), gaps={9: 256}), TrackPlan(A, pcm(5, 2), start_ms=384)]


def new_world() -> World:
    world = World()
    world.play(call_events("call-f", TRACKS))
    return world


def run_instance(world: World, faults: Faults, tmp_path: Path) -> None:
    """One recorder instance, on a spool of its own, from the world's checkpoint on."""
    config = settings(tmp_path / uuid.uuid4().hex, RECORDINGS_FORMAT="both")
    handler = RecorderHandler(
        config,
        FaultyS3(world.s3, faults),
        sink=FaultySink(MemoryPublisher(world.out), faults),
        progress=FaultyProgress(world.progress, faults),  # type: ignore[arg-type]
    )
    source = FaultySource(MemorySource(world.audio, world.checkpoints), faults)
    loop = ServiceLoop("recorder", source, handler, MemoryPublisher(world.letters))
    for record in source.poll():
        loop.process([record])
        _retried(handler.tick)
        _retried(loop.flush)
        loop.checkpoint()
    _retried(loop.flush)
    loop.checkpoint()


def distinct(events: list[RecordingStored]) -> list[RecordingStored]:
    seen: list[RecordingStored] = []
    for event in events:
        if event not in seen:
            seen.append(event)
    return seen


@pytest.fixture(autouse=True)
def _no_backoff_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("callstream.runtime.time.sleep", lambda _s: None)


def _undisturbed(tmp_path: Path, mode: str = "raise-before") -> tuple[World, list[str]]:
    world = new_world()
    faults = Faults(mode=mode)
    run_instance(world, faults, tmp_path)
    return world, faults.seen


def test_an_undisturbed_call_is_three_streamed_wavs_each_announced_once(tmp_path: Path) -> None:
    world, seen = _undisturbed(tmp_path)
    bodies = {k: o.body for k, o in world.s3.objects.items()}
    assert len(bodies) == 3 and world.s3.uploads == {}
    stereo = next(k for k in bodies if k.endswith("Z.wav"))
    assert bodies[stereo] == wav(stereo_of(TRACKS), 2)
    for plan in TRACKS:
        assert bodies[stereo.replace(".wav", f"_{plan.track.value}.wav")] == wav(plan.placed(), 1)
    assert all(o.parts >= 2 for o in world.s3.objects.values())  # every one streamed
    assert len(world.announced()) == 3
    assert {"put", "upload", "save", "publish"} <= set(seen)
    assert world.checkpoints[SHARD] == (str(len(world.audio.shards[0])), False)


@pytest.mark.parametrize("mode", MODES)
def test_a_failure_at_any_effect_leaves_the_same_objects(tmp_path: Path, mode: str) -> None:
    reference, seen = _undisturbed(tmp_path, mode)
    expected = {k: o.body for k, o in reference.s3.objects.items()}
    total = str(len(reference.audio.shards[0]))
    assert len(seen) >= 40
    for k in range(len(seen)):
        world = new_world()
        faults = Faults(fail_at=k, mode=mode)
        _, crashes = until_done(
            lambda world=world, faults=faults: run_instance(world, faults, tmp_path)
        )
        where = f"{mode} at effect {k} ({faults.seen[k]})"
        assert faults.fired, where
        assert crashes == (1 if mode.startswith("crash") else 0), where
        assert {key: o.body for key, o in world.s3.objects.items()} == expected, where
        assert world.s3.uploads == {}, where
        got = world.announced()
        assert distinct(got) == reference.announced(), where
        if mode == "raise-before":
            assert got == reference.announced(), where
        assert world.dead_letters() == [], where
        assert world.checkpoints[SHARD] == (total, False), where
        saved = world.progress.load("call-f")
        assert saved is not None and saved["done"], where
