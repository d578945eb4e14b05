"""A transcriber instance killed mid-call: the next one resumes after the last saved final.

The production handler and service loop over the in-memory bus twin, with the
burst test double as engine (each word a run of one sample value, final at
its end; see test_transcriber_recovery) and the in-memory progress twin.
"""

from __future__ import annotations

from test_transcriber_recovery import BurstEngine, C, Clock, chunks, ended, speech, truth

from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.contract import default_contract
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    Event,
    TranscriptSegmentProduced,
)
from callstream.progress import MemoryProgress
from callstream.runtime import ServiceLoop
from services.transcriber.handler import TranscriberHandler

SHARD = "shardId-000000000000"
WORDS = 6


class Instance:
    """One transcriber instance: engine, handler and loop over the shared streams."""

    def __init__(self, audio: MemoryStream, checkpoints: dict, store: MemoryProgress) -> None:
        self.clock = Clock()
        self.engine = BurstEngine(self.clock)
        self.out = MemoryStream("transcripts")
        self.handler = TranscriberHandler(
            self.engine,
            MemoryPublisher(self.out),
            "en-US",
            clock=lambda: self.clock.now,
            progress=store,
            save_interval_s=0.0,
        )
        self.loop = ServiceLoop(
            "transcriber", MemorySource(audio, checkpoints), self.handler, MemoryPublisher(audio)
        )

    def run(self, limit: int | None = None) -> None:
        """Process up to `limit` records (all when None), ticking and checkpointing each."""
        for record in self.loop.source.poll()[:limit]:
            self.clock.now += 0.128
            self.loop.process([record])
            self.handler.tick()
            self.loop.checkpoint()

    def finish(self) -> None:
        for _ in range(100):
            self.clock.now += 0.5
            self.handler.tick()
            self.loop.checkpoint()

    def events(self) -> list[Event]:
        return [default_contract().decode(r.data) for r in self.out.shards[0]]

    def heard_ms(self) -> int:
        return sum(s.heard_ms for s in self.engine.streams)


def _finals(events: list[Event]) -> list[tuple[str, int, int]]:
    return [
        (e.transcript, e.start_ms, e.end_ms)
        for e in events
        if isinstance(e, TranscriptSegmentProduced) and not e.is_partial
    ]


def _call(audio: MemoryStream, pcm: bytes, *, enabled: bool = True) -> int:
    parts = list(chunks(pcm, 128))
    events: list[Event] = [CallStarted(C, "arn", 0, transcription_enabled=enabled), *parts]
    MemoryPublisher(audio).publish([*events, ended(len(parts))])
    return len(events) + 1


def test_a_call_resumes_after_its_last_saved_final_with_every_word_once() -> None:
    audio, checkpoints, store = MemoryStream("audio"), {}, MemoryProgress()
    pcm = speech(WORDS)
    total = _call(audio, pcm)
    first = Instance(audio, checkpoints, store)
    first.run(limit=total * 3 // 5)  # killed after three words and a half
    resumed_at = int(checkpoints[SHARD][0])
    assert resumed_at > 1, "the checkpoint never moved past CallStarted"

    second = Instance(audio, checkpoints, store)
    second.run()
    second.finish()

    assert _finals(first.events()) + _finals(second.events()) == truth(WORDS)
    assert second.heard_ms() < len(pcm) // 16 * 2 // 3  # not the whole call again
    assert [e for e in second.events() if isinstance(e, CallEnded)] != []
    assert checkpoints[SHARD] == (str(total), False)


def test_a_replay_that_meets_a_finished_call_mid_way_emits_nothing() -> None:
    audio, checkpoints, store = MemoryStream("audio"), {}, MemoryProgress()
    total = _call(audio, speech(2))
    first = Instance(audio, checkpoints, store)
    first.run()
    first.finish()
    assert store.load(C) is not None and store.load(C)["done"]  # type: ignore[index]

    checkpoints[SHARD] = ("5", True)  # as if another call had held the checkpoint there
    second = Instance(audio, checkpoints, store)
    second.run()
    second.finish()
    assert second.events() == [] and second.engine.streams == []
    assert checkpoints[SHARD] == (str(total), False)


def test_a_call_without_transcription_saves_that_and_is_skipped_when_met_mid_way() -> None:
    audio, checkpoints, store = MemoryStream("audio"), {}, MemoryProgress()
    total = _call(audio, speech(3), enabled=False)
    first = Instance(audio, checkpoints, store)
    first.run(limit=10)
    assert store.load(C) is not None and not store.load(C)["enabled"]  # type: ignore[index]
    assert int(checkpoints[SHARD][0]) >= 10  # holds only its latest record

    second = Instance(audio, checkpoints, store)
    second.run()
    second.finish()
    ends = [e for e in second.events() if isinstance(e, CallEnded)]
    assert len(ends) == 1 and second.engine.streams == []
    assert checkpoints[SHARD] == (str(total), False)


def test_without_saved_progress_a_call_met_mid_way_is_not_transcribed_from_the_middle() -> None:
    audio, store = MemoryStream("audio"), MemoryProgress()
    _call(audio, speech(2))
    instance = Instance(audio, {SHARD: ("3", True)}, store)  # CallStarted and chunk 0 skipped
    instance.run()
    instance.finish()
    assert instance.events() == [] and instance.engine.streams == []


def test_resume_point_is_the_chunk_where_the_saved_finals_end() -> None:
    audio, checkpoints, store = MemoryStream("audio"), {}, MemoryProgress()
    _call(audio, speech(WORDS))
    instance = Instance(audio, checkpoints, store)
    instance.run(limit=60)
    saved = store.load(C)
    assert saved is not None
    committed = saved["tracks"]["AUDIO_FROM_CUSTOMER"]["committed_ms"]
    records = audio.shards[0]
    chunk = default_contract().decode(records[int(checkpoints[SHARD][0]) - 1].data)
    assert isinstance(chunk, AudioChunkCaptured)
    assert chunk.offset_ms <= committed < chunk.offset_ms + len(chunk.pcm) // 16


def test_a_resume_never_reaches_back_past_what_the_resend_limit_keeps() -> None:
    from services.transcriber.core import CallTranscription
    from services.transcriber.recovery import RecoveryPolicy

    clock = Clock()
    policy = RecoveryPolicy(resend_limit_ms=10_000)
    call = CallTranscription(C, BurstEngine(clock), policy=policy)
    for chunk in chunks(speech(1, period_ms=40_000, word_ms=39_000), 128):
        clock.now += 0.128
        call.accept(chunk, clock.now)  # one word to the end: no final yet
    resume = call.progress()["tracks"]["AUDIO_FROM_CUSTOMER"]["resume_sequence"]
    # 40 s of chunks sent, of which the spool keeps the last 10 s: the resume point
    # is where that begins, not the call's first chunk.
    assert resume * 128 >= 40_000 - 10_000 - 128
