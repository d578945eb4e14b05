"""Kinesis as AWS runs it: calls per shard and publish -> consumer latency, polling vs fan-out.

Usage:
    .venv/bin/python bench/bus_quota.py                      # everything below
    .venv/bin/python bench/bus_quota.py --modes efo --groups 4 --latency-calls 8 --search 24 30

Runs the project's emulator as a separate process, with Kinesis's per-shard
quotas on (its default), and for each read mode (polling, fan-out) and number
of audio consumer groups (2, 4):

- latency: `--latency-calls` synthetic calls on one shard; each call writes
  both tracks' 128 ms chunks at real-time pace (real AudioChunkCaptured
  records, through one shared `KinesisPublisher`, as ingest does); every group
  reads the shard with the project's own leased source (`KinesisSource` with
  the polling reader at the groups' share of 5 reads/s, or `FanOutSource`)
  and notes when each chunk arrives. Publish -> consumer latency is from the
  chunk handed to the publisher to the `poll()` that returns it: p50, p95.
- calls per shard: the same with more calls (`--search`, ascending), until a
  trial does not keep up. A trial keeps up when every group got every chunk,
  each group's p95 stays under 2 s and the publisher keeps pace (p95 of a
  chunk's publish finishing after it was due under 0.5 s).

Each trial measures, from the emulator's own counters, what the shard
carried per second (records and bytes written, GetRecords calls, bytes read
and pushed) and what its quotas refused. `--order` also checks, above the
write quota, that partial PutRecords failures leave every call's chunks in
order on the shard with the publisher, and counts what retrying only the
failed entries (the former publisher) does to them.

`run_trial` is the machinery `tests/integration/test_bus_quota_model.py`
checks `callstream capacity` against at small scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callstream import aws  # noqa: E402
from callstream.bus.consumer import KinesisSource  # noqa: E402
from callstream.bus.fanout import FanOutSource, register_consumer  # noqa: E402
from callstream.bus.kinesis import KinesisPublisher  # noqa: E402
from callstream.bus.leases import LeaseTable  # noqa: E402
from callstream.bus.polling import PollingReader, read_interval_s  # noqa: E402
from callstream.contract import default_contract  # noqa: E402
from callstream.events import AudioChunkCaptured, Track  # noqa: E402
from callstream_emulator.faults import remote_snapshot  # noqa: E402

CHUNK_MS = 128
CHUNK_BYTES = CHUNK_MS * 16  # 8 kHz, 16-bit
TRACKS = (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)
LATENCY_LIMIT_S = 2.0
WRITE_LAG_LIMIT_S = 0.5
FRAGMENT = "91343852333181432392682062503400000000000000"  # a real KVS fragment number's length
USAGE = ("records_written", "bytes_written", "get_records_calls", "bytes_read", "bytes_pushed")


@dataclass
class Trial:
    """One run: what was asked, what the shard carried, and whether it kept up."""

    mode: str
    groups: int
    calls: int
    seconds: float
    published: int = 0
    received: list[int] = field(default_factory=list)
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    group_p95_ms: list[float] = field(default_factory=list)
    write_lag_p95_ms: float = 0.0
    per_shard_s: dict[str, float] = field(default_factory=dict)  # emulator usage per second
    throttles: dict[str, int] = field(default_factory=dict)
    publish_requests: int = 0
    kept_up: bool = False


class _Calls:
    """N synthetic calls writing both tracks' chunks at real-time pace through one publisher."""

    def __init__(self, publisher: KinesisPublisher, calls: int) -> None:
        self.publisher = publisher
        self.contract = default_contract()
        self.contacts = [str(uuid.uuid4()) for _ in range(calls)]
        self.sent: dict[bytes, float] = {}  # record data -> perf_counter() when handed over
        self.lags: list[tuple[float, float]] = []  # (due, publish finished - due)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self, origin: float) -> list[threading.Thread]:
        threads = []
        for index, contact in enumerate(self.contacts):
            offset = index * CHUNK_MS / 1000 / len(self.contacts)  # spread over a chunk
            thread = threading.Thread(target=self._call, args=(contact, origin + offset))
            thread.start()
            threads.append(thread)
        return threads

    def _call(self, contact: str, start: float) -> None:
        seq = 0
        while not self.stop.is_set():
            due = start + seq * CHUNK_MS / 1000
            wait = due - time.perf_counter()
            if wait > 0 and self.stop.wait(wait):
                return
            items = [(contact, self._chunk(contact, track, seq)) for track in TRACKS]
            handed = time.perf_counter()
            for _, data in items:
                self.sent[data] = handed
            try:
                self.publisher.put_raw(items)
            except Exception as e:  # a failed publish is a trial that did not keep up
                self.errors.append(e)
                return
            self.lags.append((due, time.perf_counter() - due))
            seq += 1

    def _chunk(self, contact: str, track: Track, seq: int) -> bytes:
        pcm = seq.to_bytes(4, "big") * (CHUNK_BYTES // 4)
        offset = seq * CHUNK_BYTES // 2
        now_ms = int(time.time() * 1000)
        event = AudioChunkCaptured(contact, track, seq, offset, offset // 8, now_ms, pcm, FRAGMENT)
        return self.contract.encode(event)


class _Group:
    """One consumer group: a leased source polled on its own thread; notes arrivals."""

    def __init__(self, source: Any, sent: dict[bytes, float]) -> None:
        self.source = source
        self.sent = sent
        self.arrivals: list[tuple[float, float]] = []  # (handed over, latency)
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            records = self.source.poll()
            now = time.perf_counter()
            last: dict[str, str] = {}
            for record in records:
                handed = self.sent.get(record.data)
                if handed is not None:
                    self.received += 1
                    self.arrivals.append((handed, now - handed))
                last[record.shard_id] = record.sequence_number
            for shard_id, sequence_number in last.items():  # as the service loop does
                self.source.checkpoint(shard_id, sequence_number, inclusive=False)
            if not records:
                time.sleep(0.005)


def run_trial(
    env: dict[str, str],
    *,
    calls: int,
    groups: int,
    mode: str,
    seconds: float = 15.0,
    warmup_s: float = 3.0,
) -> Trial:
    """`calls` calls on one new shard read by `groups` groups in `mode` (polling | efo)."""
    region = env.get("APP_REGION", "us-east-1")
    kinesis = aws.client("kinesis", region)
    reads = aws.client(
        "kinesis", region, retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=20
    )
    stream = _new_stream(kinesis)
    leases = LeaseTable(aws.client("dynamodb", region), f"bench-leases-{uuid.uuid4().hex[:8]}")
    leases.ensure_table()
    producer = _Calls(KinesisPublisher(kinesis, stream), calls)
    consumers = [
        _Group(_source(kinesis, reads, leases, stream, f"g{g}", groups, mode), producer.sent)
        for g in range(groups)
    ]
    trial = Trial(mode, groups, calls, seconds)
    try:
        for group in consumers:
            group.source.poll()  # takes the shard's lease (and subscribes) before any chunk
            group.thread.start()
        origin = time.perf_counter() + 0.2
        threads = producer.run(origin)
        time.sleep(warmup_s)
        start, before = time.perf_counter(), _usage(env, stream)
        time.sleep(seconds)
        end, after = time.perf_counter(), _usage(env, stream)
        producer.stop.set()
        for thread in threads:
            thread.join(30)
        _drain(consumers, len(producer.sent))
        _fill(trial, producer, consumers, (start, end), before, after)
    finally:
        for group in consumers:
            group.stop.set()
            group.thread.join(10)
            group.source.close()
        kinesis.delete_stream(StreamName=stream, EnforceConsumerDeletion=True)
    return trial


def _new_stream(kinesis: Any) -> str:
    name = f"bench-quota-{uuid.uuid4().hex[:8]}"
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.2})
    return name


def _source(
    kinesis: Any, reads: Any, leases: LeaseTable, stream: str, group: str, groups: int, mode: str
) -> KinesisSource:
    common: dict[str, Any] = {
        "stream": stream,
        "group": group,
        "worker_id": f"bench-{group}",
        "checkpoint_interval_s": 1.0,
    }
    if mode == "efo":
        arn = register_consumer(kinesis, stream, group)
        return FanOutSource(reads, leases, consumer_arn=arn, **common)
    reader = PollingReader(reads, stream, interval_s=read_interval_s(groups))
    return KinesisSource(reads, leases, reader=reader, **common)


def _usage(env: dict[str, str], stream: str) -> dict[str, Any]:
    snapshot = remote_snapshot(env["CALLSTREAM_EMULATOR_CONTROL_URL"])["kinesis_quotas"]
    usage: dict[str, int] = next(
        (v for k, v in snapshot["usage"].items() if k.startswith(f"{stream}/")), {}
    )
    throttles: dict[str, int] = {}
    for item in snapshot["throttles"]:
        if item["stream"] == stream:
            throttles[item["operation"]] = throttles.get(item["operation"], 0) + item["count"]
    return {"usage": usage, "throttles": throttles}


def _drain(consumers: list[_Group], published: int, timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(g.received < published for g in consumers):
        time.sleep(0.1)


def _fill(
    trial: Trial,
    producer: _Calls,
    consumers: list[_Group],
    window: tuple[float, float],
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    start, end = window
    span = end - start
    trial.published = len(producer.sent)
    trial.received = [g.received for g in consumers]
    in_window = [[lat for at, lat in g.arrivals if start <= at < end] for g in consumers]
    every = [lat for group in in_window for lat in group]
    trial.latency_p50_ms = _pct(every, 50)
    trial.latency_p95_ms = _pct(every, 95)
    trial.group_p95_ms = [_pct(group, 95) for group in in_window]
    trial.write_lag_p95_ms = _pct([lag for due, lag in producer.lags if start <= due < end], 95)
    trial.per_shard_s = {
        k: (after["usage"].get(k, 0) - before["usage"].get(k, 0)) / span for k in USAGE
    }
    trial.throttles = {
        op: n - before["throttles"].get(op, 0) for op, n in after["throttles"].items()
    }
    trial.publish_requests = producer.publisher.requests
    trial.kept_up = (
        not producer.errors
        and all(n >= trial.published for n in trial.received)
        and max(trial.group_p95_ms, default=0) < LATENCY_LIMIT_S * 1000
        and trial.write_lag_p95_ms < WRITE_LAG_LIMIT_S * 1000
    )


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


# --- order under the write quota -------------------------------------------------------
class _FailedOnlyPublisher(KinesisPublisher):
    """The former retry: every record of a publish in one request, then only the refused
    ones again (a later record of a key may be stored before an earlier one)."""

    def put_raw(self, items: Any) -> None:
        pending = list(items)
        while pending:
            entries = [{"PartitionKey": k, "Data": d} for k, d in pending]
            self.requests += 1
            response = self.client.put_records(StreamName=self.stream, Records=entries)
            results = response["Records"]
            pending = [item for item, r in zip(pending, results, strict=True) if "ErrorCode" in r]
            if pending:
                time.sleep(0.05)


def order_check(
    env: dict[str, str], calls: int, seconds: float, failed_only: bool
) -> dict[str, Any]:
    """`calls` calls over one shard's write quota, each publish a fragment's worth (8 chunks
    per track, as ingest does when a fragment arrives whole); the shard read back."""
    kinesis = aws.client("kinesis", env.get("APP_REGION", "us-east-1"))
    stream = _new_stream(kinesis)
    kind = _FailedOnlyPublisher if failed_only else KinesisPublisher
    publisher = kind(kinesis, stream)
    contract = default_contract()
    stop = threading.Event()

    def call(contact: str) -> None:
        seq = 0
        while not stop.is_set():
            batch = [
                (contact, contract.encode(_event(contact, track, s)))
                for s in range(seq, seq + 8)
                for track in TRACKS
            ]
            publisher.put_raw(batch)
            seq += 8
            stop.wait(8 * CHUNK_MS / 1000)

    threads = [threading.Thread(target=call, args=(str(uuid.uuid4()),)) for _ in range(calls)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    throttles = _usage(env, stream)["throttles"].get("PutRecords", 0)
    inversions, repeats, chunks = _read_back(kinesis, stream, contract)
    kinesis.delete_stream(StreamName=stream, EnforceConsumerDeletion=True)
    return {
        "publisher": "failed entries only" if failed_only else "ordered (one per key in flight)",
        "calls": calls,
        "chunks": chunks,
        "entries_throttled": throttles,
        "requests": publisher.requests,
        "out_of_order": inversions,
        "repeated": repeats,
    }


def _event(contact: str, track: Track, seq: int) -> AudioChunkCaptured:
    offset = seq * CHUNK_BYTES // 2
    pcm = bytes(CHUNK_BYTES)
    return AudioChunkCaptured(contact, track, seq, offset, offset // 8, offset // 8, pcm, "1")


def _read_back(kinesis: Any, stream: str, contract: Any) -> tuple[int, int, int]:
    shard = kinesis.list_shards(StreamName=stream)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    last: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, str, int]] = set()
    inversions = repeats = chunks = 0
    while iterator:
        page = _get_records(kinesis, iterator)
        for record in page["Records"]:
            event = contract.decode(record["Data"])
            key = (event.contact_id, event.track.value)
            if (*key, event.sequence) in seen:
                repeats += 1
                continue
            seen.add((*key, event.sequence))
            chunks += 1
            if event.sequence < last.get(key, -1):
                inversions += 1
            last[key] = max(last.get(key, -1), event.sequence)
        iterator = page.get("NextShardIterator")
        if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
            break
    return inversions, repeats, chunks


def _get_records(kinesis: Any, iterator: str) -> dict[str, Any]:
    while True:
        try:
            response: dict[str, Any] = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            return response
        except kinesis.exceptions.ProvisionedThroughputExceededException:
            time.sleep(0.5)


# --- what a PutRecords costs the producer ------------------------------------------------
def put_cost(env: dict[str, str], requests: int = 200) -> list[dict[str, float]]:
    """Client CPU and wall time per PutRecords of 1, 2, 8 and 16 chunk records (the emulator
    runs in another process, so process time is the producer's own)."""
    kinesis = aws.client("kinesis", env.get("APP_REGION", "us-east-1"))
    stream = _new_stream(kinesis)
    contract = default_contract()
    rows = []
    for per in (1, 2, 8, 16):
        count = max(10, requests // per)
        chunks = [_event(f"c{i}", Track.FROM_CUSTOMER, i) for i in range(per)]
        items = [{"PartitionKey": c.contact_id, "Data": contract.encode(c)} for c in chunks]
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(count):
            kinesis.put_records(StreamName=stream, Records=items)
            time.sleep(0.03)  # stay under the shard's write quota
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall - count * 0.03
        rows.append(
            {
                "records_per_request": per,
                "cpu_ms_per_request": cpu / count * 1000,
                "cpu_ms_per_record": cpu / count / per * 1000,
                "wall_ms_per_request": wall / count * 1000,
            }
        )
    kinesis.delete_stream(StreamName=stream, EnforceConsumerDeletion=True)
    return rows


# --- the run ---------------------------------------------------------------------------
@contextmanager
def emulator_process() -> Iterator[dict[str, str]]:
    """The emulator in its own process (quotas on), and the environment that reaches it."""
    with tempfile.TemporaryDirectory() as workdir:
        state = Path(workdir) / "emulator.json"
        process = subprocess.Popen(
            [sys.executable, "-m", "callstream_emulator", "--state-file", str(state)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k != "CALLSTREAM_EMULATOR_KINESIS_QUOTAS"},
        )
        try:
            deadline = time.monotonic() + 60
            while not state.exists():
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the emulator did not start")
                time.sleep(0.1)
            time.sleep(0.2)
            env = json.loads(state.read_text())["env"]
            os.environ.update(env)
            yield env
        finally:
            process.terminate()
            process.wait(30)


def _line(t: Trial) -> str:
    usage = t.per_shard_s
    return (
        f"{t.mode:<7} {t.groups} groups {t.calls:>3} calls: "
        f"{'kept up' if t.kept_up else 'DID NOT keep up'}; latency p50 {t.latency_p50_ms:.0f} ms "
        f"p95 {t.latency_p95_ms:.0f} ms (worst group p95 {max(t.group_p95_ms):.0f} ms); "
        f"write lag p95 {t.write_lag_p95_ms:.0f} ms; per shard {usage['records_written']:.0f} "
        f"records/s, {usage['bytes_written'] / 1048576:.3f} MiB/s in, "
        f"{usage['get_records_calls']:.1f} GetRecords/s, "
        f"{(usage['bytes_read'] + usage['bytes_pushed']) / 1048576:.3f} MiB/s out; "
        f"throttled {t.throttles or 'nothing'}; received {min(t.received)}/{t.published}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["polling", "efo"])
    parser.add_argument("--groups", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--latency-calls", type=int, default=8)
    parser.add_argument("--search", nargs="*", type=int, default=[12, 16, 20, 24, 28, 30, 32])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--order", action="store_true", help="also the order check")
    parser.add_argument("--put-cost", action="store_true", help="also PutRecords' client cost")
    parser.add_argument("--json", type=Path, help="write every trial here")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} cores {os.cpu_count()}; load {os.getloadavg()}")
    trials: list[dict[str, Any]] = []
    with emulator_process() as env:
        if args.put_cost:
            for row in put_cost(env):
                print(row, flush=True)
        if args.order:
            for failed_only in (False, True):
                print(order_check(env, 36, args.seconds, failed_only), flush=True)
        for mode in args.modes:
            for groups in args.groups:
                kept = 0
                for calls in [args.latency_calls, *args.search]:
                    trial = run_trial(
                        env, calls=calls, groups=groups, mode=mode, seconds=args.seconds
                    )
                    trials.append(asdict(trial))
                    print(_line(trial), flush=True)
                    if not trial.kept_up:
                        break
                    kept = calls
                print(f"=> {mode}, {groups} groups: one shard carries {kept} calls", flush=True)
    if args.json:
        args.json.write_text(json.dumps(trials, indent=1))
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
