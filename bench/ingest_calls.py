"""Live calls per ingest process: CPU and memory per call at real-time pace.

Usage: .venv/bin/python bench/ingest_calls.py [--calls 200] [--seconds 30]

The harness (this process) runs the embedded emulator and plays N Connect
calls into N KVS streams at real-time pace: every 1.024 s each call gets one
more fragment (16 blocks per track), split by the emulator's own PutMedia
fragmenter and stored as PutMedia would store it (the producer side is
simulated in-process so the harness stays cheap; GetMedia is the real HTTP
endpoint). A separate worker process, `--worker`, is one ingest process: it
runs one `CallSession` per call on a thread pool, exactly as
services/ingest/main.py does, with real boto3 GetMediaForFragmentList and
GetMedia, and a sink that Avro-encodes every event (as the Kinesis publisher
would) and drops it.

The worker reports its own CPU time (getrusage) over the run, its resident
memory before the calls (after imports and clients) and at its peak while
all calls run, and whether every call got exactly its PCM. CPU per call =
worker CPU seconds / call-seconds of audio; calls per core = its inverse.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT = 16384  # PCM bytes per track per fragment (1.024 s)
STEADY_AFTER_MS = 10_000  # chunk ages are taken from this far into each call
ARRIVAL = threading.local()  # when the current session thread's last media read arrived


def timed_media(base: type) -> type:
    """A KvsMedia whose GetMedia reads note their arrival time in ARRIVAL."""

    class TimedMedia(base):  # type: ignore[misc, valid-type]
        def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Any:
            for data in super().get_media(stream_arn, selector):
                ARRIVAL.at = time.perf_counter()
                yield data

    return TimedMedia


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- worker: one ingest process ---------------------------------------------------------


@dataclass
class EncodingSink:
    """Encodes like the Kinesis publisher, keeps counts and chunk ages only."""

    contract: Any
    stream: str = "audio"
    lock: threading.Lock = field(default_factory=threading.Lock)
    pcm_bytes: dict[str, int] = field(default_factory=dict)
    ages_ms: list[int] = field(default_factory=list)
    handover_us: list[float] = field(default_factory=list)
    records: int = 0
    encoded: int = 0

    def publish(self, events: Any) -> None:
        now_ms = int(time.time() * 1000)
        sizes = [len(self.contract.encode(e)) for e in events]
        arrived = getattr(ARRIVAL, "at", None)
        handover = (time.perf_counter() - arrived) * 1e6 if arrived is not None else None
        with self.lock:
            if handover is not None and any(hasattr(e, "pcm") for e in events):
                self.handover_us.append(handover)
            self.records += len(sizes)
            self.encoded += sum(sizes)
            for e in events:
                pcm = getattr(e, "pcm", None)
                if pcm is not None:
                    key = f"{e.contact_id}/{e.track.value}"
                    self.pcm_bytes[key] = self.pcm_bytes.get(key, 0) + len(pcm)
                    if e.offset_ms >= STEADY_AFTER_MS:  # past the start-up backlog
                        self.ages_ms.append(now_ms - (e.start_time_ms + len(pcm) // 16))


def worker(chunk_ms: int) -> None:
    """Read calls (JSON lines) from stdin, run them all, print stats as JSON."""
    from callstream.contract import default_contract
    from callstream.events import CallStarted
    from services.ingest.media import KvsMedia
    from services.ingest.session import CallSession

    calls = [json.loads(line) for line in sys.stdin if line.strip()]
    media = timed_media(KvsMedia)(os.environ["AWS_DEFAULT_REGION"], max_connections=len(calls) + 8)
    sink = EncodingSink(default_contract())
    media.control.describe_stream(StreamARN=calls[0]["arn"])  # warm the control client
    baseline, peak = rss_bytes(), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            peak[0] = max(peak[0], rss_bytes())

    threading.Thread(target=sample, daemon=True).start()
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    with ThreadPoolExecutor(len(calls), thread_name_prefix="call") as pool:
        sessions = [
            CallSession(
                CallStarted(c["contact"], c["arn"], 0, start_fragment_number=c["first"]),
                media,
                sink,
                chunk_ms,
                idle_timeout_s=30,
            )
            for c in calls
        ]
        ends = list(pool.map(lambda s: s.run(), sessions))
    cpu, wall = cpu_seconds() - cpu0, time.monotonic() - wall0
    stop.set()
    print(
        json.dumps(
            {
                "cpu_s": cpu,
                "wall_s": wall,
                "rss_baseline": baseline,
                "rss_peak": peak[0],
                "pcm_bytes": sink.pcm_bytes,
                "reasons": sorted({e.reason.value for e in ends}),
                "records": sink.records,
                "encoded_bytes": sink.encoded,
                "age_p50_ms": statistics.median(sink.ages_ms) if sink.ages_ms else None,
                "age_p99_ms": _p99(sink.ages_ms),
                "handover_p50_us": statistics.median(sink.handover_us),
                "handover_p99_us": _p99([round(v) for v in sink.handover_us]),
            }
        )
    )


def _p99(values: list[int]) -> float | None:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else None


# -- harness: emulator and paced producers --------------------------------------------


@dataclass
class PlayedCall:
    contact: str
    arn: str
    writer: Any
    fragmenter: Any
    first: str = ""


def play(
    emulator: Any, calls: list[PlayedCall], pcm: bytes, fragments: int, lags: list[float]
) -> None:
    """Store one fragment per call per 1.024 s; the fragmenter releases the previous one.

    `lags` gets, per tick, how late the last call's fragment was stored (harness lag).
    """
    from callstream_emulator.kvs_media import now_ms
    from callstream_emulator.kvs_store import StoredFragment

    def store(call: PlayedCall, released: list[Any]) -> None:
        for media in released:
            if hasattr(media, "cluster"):
                number = emulator.store.next_number()
                emulator.store.append(
                    call.arn, StoredFragment(number, now_ms(), media.timecode_ms, media)
                )
                call.first = call.first or str(number)

    started = time.monotonic()
    for index in range(fragments):
        time.sleep(max(0.0, started + index * 1.024 - time.monotonic()))
        piece = pcm[(index % 8) * FRAGMENT : (index % 8 + 1) * FRAGMENT]
        for call in calls:
            data = call.writer.producer_fragment(piece, piece[::-1])
            if index == 0:
                data = call.writer.producer_header() + data
            store(call, call.fragmenter.feed(data))
        lags.append(time.monotonic() - (started + index * 1.024))
    for call in calls:
        store(call, call.fragmenter.close())
        emulator.store.producer_disconnected(call.arn)


def run_bench(calls_n: int, seconds: int, chunk_ms: int) -> dict[str, Any]:
    """Start the emulator, N streams and the worker; play; return the worker's stats."""
    import boto3

    from callstream.mkv.writer import ConnectCallWriter
    from callstream_emulator.emulator import Emulator
    from callstream_emulator.kvs_fragmenter import Fragmenter

    pcm = os.urandom(8 * FRAGMENT)
    fragments = round(seconds / 1.024)
    with Emulator(get_media_idle_timeout=1.0) as emulator:
        os.environ.update(emulator.env())
        env = dict(os.environ)
        kvs = boto3.Session(region_name=emulator.region).client("kinesisvideo")
        calls = []
        for _ in range(calls_n):
            contact = str(uuid.uuid4())
            arn = kvs.create_stream(StreamName=f"bench-{contact[:8]}")["StreamARN"]
            emulator.store.producer_connected(arn)
            writer = ConnectCallWriter(contact, "instance", int(time.time() * 1000))
            calls.append(PlayedCall(contact, arn, writer, Fragmenter()))
        lags: list[float] = []
        player = threading.Thread(target=play, args=(emulator, calls, pcm, fragments, lags))
        player.start()
        while not all(c.first for c in calls):
            time.sleep(0.05)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--chunk-ms", str(chunk_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        lines = "".join(
            json.dumps({"contact": c.contact, "arn": c.arn, "first": c.first}) + "\n" for c in calls
        )
        out, _ = proc.communicate(lines, timeout=seconds * 4 + 120)
        player.join()
    stats: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    stats["expected_pcm_per_track"] = fragments * FRAGMENT
    stats["harness_lag_p50_ms"] = 1000 * statistics.median(lags)
    stats["harness_lag_max_ms"] = 1000 * max(lags)
    return stats


def report(calls_n: int, seconds: int, chunk_ms: int, stats: dict[str, Any]) -> None:
    """Print what was measured."""
    per_track = stats.pop("pcm_bytes")
    expected = stats["expected_pcm_per_track"]
    exact = sum(v == expected for v in per_track.values())
    audio_s = sum(per_track.values()) / 16000 / 2  # call-seconds (two tracks per call)
    cpu_per_call = stats["cpu_s"] / audio_s
    mem_per_call = (stats["rss_peak"] - stats["rss_baseline"]) / calls_n
    print(
        f"{calls_n} calls x {seconds} s, real-time pace, chunk {chunk_ms} ms, {os.cpu_count()} cpus"
    )
    print(f"  tracks with exactly their PCM: {exact}/{2 * calls_n}; end reasons {stats['reasons']}")
    print(
        f"  worker CPU {stats['cpu_s']:.2f} s over {stats['wall_s']:.1f} s wall"
        f" for {audio_s:.0f} call-seconds"
    )
    print(
        f"  CPU per live call: {100 * cpu_per_call:.3f}% of a core"
        f" -> {1 / cpu_per_call:.0f} calls per core"
    )
    print(
        f"  RSS baseline {stats['rss_baseline'] / 2**20:.1f} MiB,"
        f" peak {stats['rss_peak'] / 2**20:.1f} MiB"
        f" -> {mem_per_call / 2**20:.2f} MiB per call"
    )
    print(
        f"  records {stats['records']},"
        f" {stats['encoded_bytes'] / max(1, stats['records']):.0f} B each"
    )
    print(
        "  chunk age at publish, 10 s on (includes KVS's hold of the newest fragment, ~1 s):"
        f" p50 {stats['age_p50_ms']} ms, p99 {stats['age_p99_ms']} ms;"
        f" harness lag storing fragments p50 {stats['harness_lag_p50_ms']:.0f} ms,"
        f" max {stats['harness_lag_max_ms']:.0f} ms"
    )
    print(
        "  inside the worker, media read arrived -> chunk handed to the producer:"
        f" p50 {stats['handover_p50_us']:.0f} us, p99 {stats['handover_p99_us']:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--chunk-ms", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        worker(args.chunk_ms)
        return
    report(
        args.calls, args.seconds, args.chunk_ms, run_bench(args.calls, args.seconds, args.chunk_ms)
    )


if __name__ == "__main__":
    main()
