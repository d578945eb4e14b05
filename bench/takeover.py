"""Benchmark: how long a killed instance's shards go unprocessed, and what it adds to latency.

Stand-alone: ``.venv/bin/python bench/takeover.py [--lease-ms 3000] [--shards 4]``
(about a minute). Starts the embedded emulator and two recorder processes
sharing an audio stream of `--shards` shards, then publishes a short call
(CallStarted, one 128 ms chunk per track, CallEnded) every `--interval-ms`,
each under a new contact id, so calls land on every shard. It measures, per
call, the time from publishing its CallEnded to its WAVs being in S3.

After a warm-up, one recorder is SIGKILLed. Printed:

- takeover: from the kill until every shard the dead instance held is leased
  by the survivor (read from the lease table), against the target of
  2 x the lease period;
- resumed: from the kill until the first call published after the kill on
  one of those shards is stored;
- latency (p50 / p90 / max) of calls before the kill, and of calls
  published in the takeover window, i.e. the end-to-end latency a takeover adds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callstream import aws
from callstream.bus.kinesis import KinesisPublisher
from callstream.bus.leases import LeaseTable
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Track
from callstream_emulator.emulator import CLEARED_ENV, Emulator
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision

PCM = b"\x01\x02" * 1024  # one 128 ms chunk


def call_events(contact: str, now_ms: int) -> list[Any]:
    """A minimal complete call: start, one chunk per track, end."""
    chunks = [
        AudioChunkCaptured(contact, track, 0, 0, 0, now_ms, PCM, "1")
        for track in (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)
    ]
    counts = {Track.FROM_CUSTOMER.value: 1, Track.TO_CUSTOMER.value: 1}
    ended = CallEnded(
        contact, EndReason.END_OF_STREAM, now_ms, chunk_counts=counts, call_start_time_ms=now_ms
    )
    return [CallStarted(contact, "arn", now_ms), *chunks, ended]


def shard_of(contact: str, shards: list[dict[str, Any]]) -> str:
    """The shard a partition key lands on (Kinesis: MD5 into the hash ranges)."""
    key = int(hashlib.md5(contact.encode()).hexdigest(), 16)
    for shard in shards:
        low, high = (int(shard["HashKeyRange"][k]) for k in ("StartingHashKey", "EndingHashKey"))
        if low <= key <= high:
            return str(shard["ShardId"])
    raise ValueError(contact)


class Probe:
    """Publishes calls on a timer and records when each one's WAVs appear."""

    def __init__(self, env: dict[str, str], interval_s: float) -> None:
        self.env = env
        self.interval_s = interval_s
        self.kinesis = aws.client("kinesis", env["APP_REGION"])
        self.s3 = aws.client("s3", env["APP_REGION"])
        self.publisher = KinesisPublisher(self.kinesis, env["CALLSTREAM_AUDIO_STREAM"])
        self.shards = self.kinesis.list_shards(StreamName=env["CALLSTREAM_AUDIO_STREAM"])["Shards"]
        self.sent: dict[str, tuple[float, str]] = {}  # contact -> (published at, shard)
        self.stored: dict[str, float] = {}
        self.stop = threading.Event()

    def publish_loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            contact = f"bench-{uuid.uuid4().hex[:12]}"
            self.publisher.publish(call_events(contact, int(time.time() * 1000)))
            self.sent[contact] = (time.monotonic(), shard_of(contact, self.shards))

    def watch_loop(self) -> None:
        bucket = self.env["RECORDINGS_BUCKET_NAME"]
        while not self.stop.wait(0.1):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
            seen = time.monotonic()
            for key in keys:
                contact = key.split("/")[-1].split("_")[0]
                if key.endswith("AUDIO_TO_CUSTOMER.wav") and contact not in self.stored:
                    self.stored[contact] = seen


def owners(env: dict[str, str]) -> dict[str, str | None]:
    """Shard -> owner of the recorder's audio-stream leases."""
    table = LeaseTable(aws.client("dynamodb", env["APP_REGION"]), env["CALLSTREAM_LEASE_TABLE"])
    return {
        lease.shard_id: lease.owner
        for lease in table.scan(f"recorder/{env['CALLSTREAM_AUDIO_STREAM']}/")
    }


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    median = statistics.median(ordered)
    return f"p50 {median:.2f} s, p90 {p90:.2f} s, max {ordered[-1]:.2f} s (n={len(ordered)})"


def run(lease_ms: int, shards: int, interval_ms: int, warmup_s: float, after_s: float) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="takeover-"))
    with Emulator() as emulator:
        env = {
            **emulator.env(),
            "RECORDINGS_BUCKET_NAME": "takeover-bench",
            "CALLSTREAM_SPOOL_DIR": str(workdir / "spool"),
            "CALLSTREAM_POLL_INTERVAL_MS": "100",
            "CALLSTREAM_LEASE_MS": str(lease_ms),
        }
        for name in CLEARED_ENV:
            os.environ.pop(name, None)
        os.environ.update(env)
        provision(env, audio_shards=shards)
        env["CALLSTREAM_AUDIO_STREAM"] = "callstream-audio"
        env["CALLSTREAM_LEASE_TABLE"] = "callstream-leases"
        group = ServiceGroup(env, workdir / "logs")
        group.start(names=("recorder",), instances=2)
        probe = Probe(env, interval_ms / 1000)
        threads = [
            threading.Thread(target=t, daemon=True) for t in (probe.publish_loop, probe.watch_loop)
        ]
        for thread in threads:
            thread.start()
        try:
            measure(env, group, probe, lease_ms, warmup_s, after_s)
        finally:
            probe.stop.set()
            group.stop()


def measure(
    env: dict[str, str],
    group: ServiceGroup,
    probe: Probe,
    lease_ms: int,
    warmup_s: float,
    after_s: float,
) -> None:
    time.sleep(warmup_s)
    victim = group.processes[0]
    held = owners(env)
    worker = next(
        (o for o in held.values() if o and o.startswith(f"recorder-{victim.index}-")), None
    )
    dead_shards = {s for s, o in held.items() if o == worker}
    killed_at = time.monotonic()
    victim.kill()
    taken_at = None
    while time.monotonic() - killed_at < after_s:
        current = owners(env)
        if (
            taken_at is None
            and dead_shards
            and all(current[s] not in (None, worker) for s in dead_shards)
        ):
            taken_at = time.monotonic()
        time.sleep(0.05)
    report(probe, killed_at, taken_at, dead_shards, lease_ms)


def report(
    probe: Probe, killed_at: float, taken_at: float | None, dead: set[str], lease_ms: int
) -> None:
    latency = {
        c: probe.stored[c] - sent for c, (sent, _) in probe.sent.items() if c in probe.stored
    }
    before = [v for c, v in latency.items() if probe.sent[c][0] < killed_at]
    window_end = killed_at + 2 * lease_ms / 1000
    during = [
        v
        for c, v in latency.items()
        if killed_at <= probe.sent[c][0] <= window_end and probe.sent[c][1] in dead
    ]
    resumed = [
        probe.stored[c]
        for c, (sent, shard) in probe.sent.items()
        if sent >= killed_at and shard in dead and c in probe.stored
    ]
    lost = [
        c for c in probe.sent if c not in probe.stored and probe.sent[c][0] < time.monotonic() - 10
    ]
    print(f"lease period {lease_ms} ms; the killed instance held {sorted(dead)}")
    if taken_at is None:
        print("takeover: NOT within the observation window")
    else:
        target = 2 * lease_ms / 1000
        print(f"takeover: {taken_at - killed_at:.2f} s from SIGKILL (target < {target:.1f} s)")
    if resumed:
        print(
            "resumed: first call on those shards stored "
            f"{min(resumed) - killed_at:.2f} s after the kill"
        )
    print(f"latency before the kill: {percentiles(before)}")
    print(f"latency of calls on the dead shards during the takeover window: {percentiles(during)}")
    print(
        f"calls published {len(probe.sent)}, stored {len(probe.stored)}, "
        f"missing (older than 10 s) {len(lost)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lease-ms", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--interval-ms", type=int, default=200)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=15.0)
    args = parser.parse_args()
    run(args.lease_ms, args.shards, args.interval_ms, args.warmup_s, args.after_s)


if __name__ == "__main__":
    main()
