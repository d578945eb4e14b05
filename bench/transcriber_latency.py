"""Transcriber latency through the embedded emulator, and the calls one process keeps up with.

Starts the embedded emulator and one transcriber process (`python -m
services.transcriber.main`, offline engine, partials on), then publishes
`AudioChunkCaptured` for N calls (both tracks of the 48 s sample call, starts
staggered by 0.37 s) to the audio stream at real-time pace, 128 ms chunks, and
tails the transcripts stream. A segment's latency is the time from the publish
of the chunk holding the end of its audio (`end_ms`) to its arrival on the
transcripts stream: p50 and p95, partials and finals apart. A run is
"sustained" when every call's CallEnded arrives within 5 s of its last chunk.

    .venv/bin/python bench/transcriber_latency.py --calls 1 4 6
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from callstream import aws
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.tail import StreamTail
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Event,
    Track,
    TranscriptSegmentProduced,
)
from callstream_emulator.demo import adopt_env, local_env
from callstream_emulator.emulator import Emulator
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "call"
FILES = {Track.TO_CUSTOMER: "agent.wav", Track.FROM_CUSTOMER: "customer.wav"}
CHUNK_MS = 128
CHUNK_BYTES = CHUNK_MS * 16


@dataclass
class Run:
    """Publish times of chunks and arrival times of what came back."""

    published: dict[tuple[str, str, int], float] = field(default_factory=dict)
    last_chunk_at: dict[str, float] = field(default_factory=dict)
    segments: list[tuple[float, TranscriptSegmentProduced]] = field(default_factory=list)
    ended_at: dict[str, float] = field(default_factory=dict)


def read_pcm(name: str) -> bytes:
    with wave.open(str(SAMPLES / name)) as w:
        return w.readframes(w.getnframes())


def publish_calls(publisher: KinesisPublisher, contacts: list[str], run: Run) -> None:
    """Every call's chunks at real-time pace (one PutRecords per tick), then CallEnded."""
    pcm = {track: read_pcm(name) for track, name in FILES.items()}
    count = max(len(p) for p in pcm.values()) // CHUNK_BYTES
    publisher.publish([CallStarted(c, "arn:local", 0) for c in contacts])
    origin = time.monotonic()
    delays = {c: i * 0.37 for i, c in enumerate(contacts)}
    sent = dict.fromkeys(contacts, 0)
    while any(n < count for n in sent.values()):
        now = time.monotonic()
        batch: list[Event] = []
        for contact in contacts:
            due = min(count, int((now - origin - delays[contact]) * 1000 // CHUNK_MS) + 1)
            for seq in range(sent[contact], max(sent[contact], due)):
                batch += [_chunk(contact, track, seq, p) for track, p in pcm.items()]
            sent[contact] = max(sent[contact], due)
        if batch:
            publisher.publish(batch)
            at = time.monotonic()
            for event in batch:
                assert isinstance(event, AudioChunkCaptured)
                run.published[(event.contact_id, event.track.value, event.sequence)] = at
        for contact in contacts:
            if sent[contact] == count and contact not in run.last_chunk_at:
                run.last_chunk_at[contact] = time.monotonic()
                counts = {t.value: count for t in FILES}
                publisher.publish(
                    [CallEnded(contact, EndReason.END_OF_STREAM, 0, chunk_counts=counts)]
                )
        time.sleep(0.02)


def _chunk(contact: str, track: Track, seq: int, pcm: bytes) -> AudioChunkCaptured:
    offset = seq * CHUNK_BYTES // 2
    data = pcm[seq * CHUNK_BYTES : (seq + 1) * CHUNK_BYTES]
    return AudioChunkCaptured(contact, track, seq, offset, offset // 8, offset // 8, data, "1")


def follow(tail: StreamTail, contacts: set[str], run: Run, deadline: float) -> None:
    while set(run.ended_at) < contacts and time.monotonic() < deadline:
        for event in tail.poll():
            at = time.monotonic()
            if isinstance(event, TranscriptSegmentProduced) and event.contact_id in contacts:
                run.segments.append((at, event))
            elif isinstance(event, CallEnded) and event.contact_id in contacts:
                run.ended_at[event.contact_id] = at
        time.sleep(0.05)


def latencies(run: Run, partial: bool) -> list[float]:
    out = []
    for at, seg in run.segments:
        if seg.is_partial != partial:
            continue
        seq = max(0, (seg.end_ms - 1) // CHUNK_MS)
        published = run.published.get((seg.contact_id, seg.track.value, seq))
        if published is not None:
            out.append(at - published)
    return out


def measure(env: dict[str, str], calls: int) -> None:
    contacts = [f"bench-{calls}-{uuid.uuid4().hex[:8]}" for _ in range(calls)]
    kinesis = aws.client("kinesis", env.get("APP_REGION", "us-east-1"))
    tail = StreamTail(
        kinesis, env.get("CALLSTREAM_TRANSCRIPTS_STREAM", "callstream-transcripts"), latest=True
    )
    tail.poll()
    run = Run()
    publisher = KinesisPublisher(kinesis, env.get("CALLSTREAM_AUDIO_STREAM", "callstream-audio"))
    follower = threading.Thread(
        target=follow, args=(tail, set(contacts), run, time.monotonic() + 180)
    )
    follower.start()
    publish_calls(publisher, contacts, run)
    follower.join()
    lag = [run.ended_at.get(c, float("inf")) - run.last_chunk_at[c] for c in contacts]
    ok = max(lag) < 5.0
    print(
        f"{calls} calls ({2 * calls} tracks): partial p50 {_pct(latencies(run, True), 50)} "
        f"p95 {_pct(latencies(run, True), 95)}; final p50 {_pct(latencies(run, False), 50)} "
        f"p95 {_pct(latencies(run, False), 95)}; CallEnded after last chunk max {max(lag):.2f} s: "
        f"{'sustained' if ok else 'NOT sustained'}"
    )


def _pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f} s" if values else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}; load average {os.getloadavg()}")
    with Emulator() as emulator, tempfile.TemporaryDirectory() as workdir:
        env = {**local_env(emulator, Path(workdir)), "CALLSTREAM_ASR_ENGINE": "offline"}
        adopt_env(env)
        provision(env, audio_shards=1)
        group = ServiceGroup(env, Path(workdir) / "logs")
        group.start(("transcriber",))
        try:
            time.sleep(8.0)  # model load
            for calls in args.calls:
                measure(env, calls)
        finally:
            group.stop()
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
