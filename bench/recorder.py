"""Many long calls through one recorder: memory, disk and CPU per call, time to a stored WAV.

Usage: .venv/bin/python bench/recorder.py [--calls 100] [--seconds 600] [--speed 8]

The embedded emulator (S3, DynamoDB, Kinesis) runs in a child process, so
this process is the recorder alone: the production `RecorderHandler` and
`ServiceLoop`, boto3 S3 with 5 MiB parts, progress in DynamoDB, RecordingStored
published to Kinesis, the default stereo format. Its input is a synthetic
audio shard: `--calls` calls of `--seconds` each, both tracks' 128 ms chunks
Avro-encoded as ingest publishes them and handed over when due at `--speed`
times real time, call starts spread over the first tenth of a call, so all
of them run at once for most of the run.

The recorder runs as the service does: a poll of the shard at most every
200 ms, S3 steps on its pool of `CALLSTREAM_RECORDING_UPLOAD_WORKERS` (8).

Reported:
- peak resident memory of this process above its level before the calls,
  and the spool's peak disk use (allocated blocks), each per call;
- CPU seconds of the recorder's work (its threads; not making the input
  records, not the bench's sampling) per hour of call audio;
- recording ready after CallEnded: from the moment CallEnded is due on the
  stream to the RecordingStored publish, p50 and p95 (and whether the
  recorder kept up: the lag of the records it handled behind their due time);
- every recording checked after the run: its S3 CRC32, byte count and the
  RecordingStored checksum against the expected stereo WAV built here.
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callstream import aws  # noqa: E402
from callstream.bus.kinesis import KinesisPublisher  # noqa: E402
from callstream.bus.memory import MemoryPublisher, MemoryStream  # noqa: E402
from callstream.bus.ports import Record  # noqa: E402
from callstream.contract import default_contract  # noqa: E402
from callstream.events import (  # noqa: E402
    AudioChunkCaptured,
    CallEnded,
    EndReason,
    Event,
    RecordingStored,
    Track,
)
from callstream.progress import DynamoProgress  # noqa: E402
from callstream.runtime import ServiceLoop  # noqa: E402
from callstream.service import ensure_stream  # noqa: E402
from services.recorder.handler import RecorderHandler  # noqa: E402
from services.recorder.settings import RecorderSettings  # noqa: E402

CHUNK = 2048  # 128 ms of one track
T0 = 1_700_000_000_000
NOISE = os.urandom(1 << 20)  # chunk PCM is a slice of this, chosen per call, track, chunk


def chunk_pcm(call: int, track: int, seq: int) -> bytes:
    offset = ((call * 7919 + track * 104729 + seq * 2053) * 2) % (len(NOISE) - CHUNK)
    return NOISE[offset : offset + CHUNK]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- the emulator, in a child process --------------------------------------------------


def _emulator(conn: Any) -> None:
    from callstream_emulator import s3_recordings
    from callstream_emulator.emulator import Emulator

    with Emulator() as emulator:
        patches = s3_recordings.apply()
        conn.send(emulator.env())
        conn.recv()  # until told to stop
        patches.revert()


# --- the input: calls due at a pace ------------------------------------------------------


@dataclass
class Calls:
    """A synthetic audio shard: each poll hands over the records due by now."""

    n: int
    seconds: int
    speed: float
    stream: str = "audio"
    started: float = 0.0
    chunks: int = 0
    next_seq: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    due_end: dict[str, float] = field(default_factory=dict)
    sequence: int = 0
    encode_cpu: float = 0.0
    max_lag: float = 0.0

    def __post_init__(self) -> None:
        self.chunks = -(-self.seconds * 16000 // CHUNK)
        self.next_seq = [0] * self.n
        self.ended = [False] * self.n
        self.spread = self.seconds / self.speed / 10  # wall seconds over which calls start

    def start(self) -> None:
        self.started = time.monotonic()

    def _offset(self, call: int) -> float:
        return self.spread * call / self.n

    def due(self, call: int, seq: int) -> float:
        """Wall time chunk `seq` of `call` is on the stream (both tracks at once)."""
        return self.started + self._offset(call) + (seq + 1) * 0.128 / self.speed

    @property
    def done(self) -> bool:
        return all(self.ended)

    def poll(self) -> list[Record]:
        now = time.monotonic()
        cpu = time.process_time()
        out: list[Record] = []
        for call in range(self.n):
            while self.next_seq[call] < self.chunks and self.due(call, self.next_seq[call]) <= now:
                seq = self.next_seq[call]
                self.max_lag = max(self.max_lag, now - self.due(call, seq))
                for track in Track:
                    out.append(self._record(call, self._chunk(call, track, seq)))
                self.next_seq[call] += 1
            if self.next_seq[call] == self.chunks and not self.ended[call]:
                self.ended[call] = True
                self.due_end[contact(call)] = self.due(call, self.chunks - 1)
                out.append(self._record(call, self._end(call)))
        self.encode_cpu += time.process_time() - cpu
        return out

    def _chunk(self, call: int, track: Track, seq: int) -> AudioChunkCaptured:
        samples = seq * CHUNK // 2
        index = 0 if track is Track.FROM_CUSTOMER else 1
        return AudioChunkCaptured(
            contact(call),
            track,
            seq,
            samples,
            samples // 8,
            T0 + samples // 8,
            chunk_pcm(call, index, seq),
            str(seq // 8),
        )

    def _end(self, call: int) -> CallEnded:
        counts = {t.value: self.chunks for t in Track}
        return CallEnded(
            contact(call), EndReason.END_OF_STREAM, 0, chunk_counts=counts, call_start_time_ms=T0
        )

    def _record(self, call: int, event: Event) -> Record:
        self.sequence += 1
        data = default_contract().encode(event)
        return Record(self.stream, "shardId-000000000000", str(self.sequence), contact(call), data)

    def checkpoint(self, shard_id: str, sequence_number: str, *, inclusive: bool) -> None:
        return None

    def rewind(self, shard_id: str, sequence_number: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


def contact(call: int) -> str:
    return f"bench-{call:04d}"


class TimedSink:
    """The recordings stream's publisher, noting when each RecordingStored went out."""

    def __init__(self, inner: KinesisPublisher) -> None:
        self.inner = inner
        self.stream = inner.stream
        self.at: dict[str, float] = {}
        self.events: dict[str, RecordingStored] = {}

    def publish(self, events: Sequence[Event]) -> None:
        self.inner.publish(events)
        for event in events:
            if isinstance(event, RecordingStored):
                self.at.setdefault(event.contact_id, time.monotonic())
                self.events[event.contact_id] = event


# --- checks ---------------------------------------------------------------------------


def expected_wav_crc(calls: Calls, call: int) -> tuple[int, int]:
    """(CRC32, bytes) of the stereo WAV the call must give."""
    from services.recorder.wav import interleave, wav_header

    pcm_bytes = calls.chunks * CHUNK * 2
    crc = zlib.crc32(wav_header(pcm_bytes, channels=2))
    step = 256
    for first in range(0, calls.chunks, step):
        seqs = range(first, min(first + step, calls.chunks))
        left = b"".join(chunk_pcm(call, 0, s) for s in seqs)
        right = b"".join(chunk_pcm(call, 1, s) for s in seqs)
        crc = zlib.crc32(interleave([left, right]), crc)
    return crc, 44 + pcm_bytes


def check(calls: Calls, sink: TimedSink, s3: Any, bucket: str) -> list[str]:
    bad = []
    for call in range(calls.n):
        event = sink.events.get(contact(call))
        if event is None:
            bad.append(f"{contact(call)}: no RecordingStored")
            continue
        crc, size = expected_wav_crc(calls, call)
        b64 = base64.b64encode(crc.to_bytes(4, "big")).decode()
        head = s3.head_object(Bucket=bucket, Key=event.key, ChecksumMode="ENABLED")
        got = (event.checksum, head.get("ChecksumCRC32"), event.byte_count, head["ContentLength"])
        if got != (b64, b64, size, size):
            bad.append(f"{event.key}: {got}, expected {(b64, b64, size, size)}")
        s3.delete_object(Bucket=bucket, Key=event.key)  # keeps the emulator's memory small
    return bad


# --- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> None:
    parent, child = multiprocessing.Pipe()
    emulator = multiprocessing.get_context("spawn").Process(target=_emulator, args=(child,))
    emulator.start()
    env = parent.recv()
    os.environ.update(env)
    region = env["APP_REGION"]
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = aws.client("s3", region)
    s3.create_bucket(Bucket=bucket)
    kinesis = aws.client("kinesis", region)
    ensure_stream(kinesis, "bench-recordings")
    spool = Path(tempfile.mkdtemp(prefix="recorder-bench-"))
    settings = RecorderSettings.from_env(
        {
            "RECORDINGS_BUCKET_NAME": bucket,
            "CALLSTREAM_SPOOL_DIR": str(spool),
            "CALLSTREAM_RECORDINGS_STREAM": "bench-recordings",
            "CALLSTREAM_WORKER_ID": "bench",
            "CALLSTREAM_RECORDING_PART_MIB": str(args.part_mib),
        }
    )
    sink = TimedSink(KinesisPublisher(kinesis, "bench-recordings"))
    progress = DynamoProgress(aws.client("dynamodb", region), f"bench-{bucket}", "recorder")
    handler = RecorderHandler(
        settings, s3, sink=sink, progress=progress, upload_workers=settings.upload_workers
    )
    calls = Calls(args.calls, args.seconds, args.speed)
    loop = ServiceLoop("recorder", calls, handler, MemoryPublisher(MemoryStream("dead")))

    baseline = rss_bytes()
    peak_rss, peak_disk = baseline, 0
    last_sample, sampling_cpu = 0.0, 0.0
    cpu_start, wall_start = time.process_time(), time.monotonic()
    calls.start()
    next_poll = time.monotonic()
    print(
        f"{args.calls} calls of {args.seconds} s at {args.speed}x: about "
        f"{args.seconds / args.speed * 1.1:.0f} s of wall time",
        flush=True,
    )
    while not (calls.done and all(handler.is_settled(contact(c)) for c in range(calls.n))):
        # As the polling reader does: a GetRecords per shard at most every 200 ms.
        time.sleep(max(next_poll - time.monotonic(), 0))
        next_poll = time.monotonic() + args.poll_s
        records = calls.poll()
        loop.process(records)
        handler.tick()
        loop.flush()
        loop.checkpoint()
        now = time.monotonic()
        if now - last_sample > 0.5:
            before = time.process_time()
            last_sample = now
            peak_rss = max(peak_rss, rss_bytes())
            peak_disk = max(peak_disk, handler.spool.disk_bytes())
            sampling_cpu += time.process_time() - before
    cpu = time.process_time() - cpu_start - calls.encode_cpu - sampling_cpu
    wall = time.monotonic() - wall_start
    peak_rss = max(peak_rss, rss_bytes())

    latencies = sorted(sink.at[c] - calls.due_end[c] for c in sink.at)
    bad = check(calls, sink, s3, bucket)
    parent.send("stop")
    emulator.join(30)

    hours = args.calls * args.seconds / 3600
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    mib = 1024 * 1024
    print(f"recordings stored and checked: {args.calls - len(bad)}/{args.calls}")
    for line in bad[:5]:
        print("  MISMATCH", line)
    print(f"wall {wall:.1f} s; input lag behind due time at most {calls.max_lag:.2f} s")
    print(
        f"peak memory above baseline: {(peak_rss - baseline) / mib:.1f} MiB "
        f"({(peak_rss - baseline) / mib / args.calls:.2f} MiB per call; baseline "
        f"{baseline / mib:.0f} MiB)"
    )
    print(
        f"peak spool disk: {peak_disk / mib:.1f} MiB ({peak_disk / mib / args.calls:.2f} MiB "
        f"per call; one whole call is {calls.chunks * CHUNK * 2 / mib:.1f} MiB of WAV)"
    )
    print(f"CPU: {cpu:.1f} s for {hours:.1f} call-hours = {cpu / hours:.1f} CPU-s per call-hour")
    print(f"ready after CallEnded: p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--speed", type=float, default=8.0, help="times real time")
    parser.add_argument("--part-mib", type=int, default=5)
    parser.add_argument("--poll-s", type=float, default=0.2, help="between two polls")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
