"""`callstream capacity`: shards, requests, instances and cost per call-hour for N calls.

A plan for N concurrent calls, from per-call figures measured on this
project and AWS's per-shard quotas and list prices (us-east-1, provisioned
streams, on-demand DynamoDB). Pure arithmetic: `plan()` takes `Inputs` and
returns a `Plan`; `register` adds the command. docs/capacity.md explains
every line and where each figure comes from.

Shards of a stream are the most its quotas require: writes (1 MiB/s and
1,000 records/s per shard); polling reads (2 MiB/s per shard *shared by
every polling group*, so G groups may each read 1/G of it); fan-out reads
(2 MiB/s per shard per registered consumer). A shard is planned at
`headroom` (default 0.8) of its quotas, so a burst or a reshard does not
throttle at once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE

MIB = 1024 * 1024
GIB = 1024 * MIB

# --- AWS quotas per shard ("Quotas and limits", Kinesis Data Streams developer guide)
WRITE_BYTES_PER_S = 1 * MIB
WRITE_RECORDS_PER_S = 1000
READ_BYTES_PER_S = 2 * MIB  # polling: shared by every group reading the shard
READ_CALLS_PER_S = 5  # polling: shared
FANOUT_BYTES_PER_S = 2 * MIB  # per registered consumer
PUT_PAYLOAD_UNIT = 25 * 1024  # a record is billed in 25 KB payload units

# --- per-call figures, measured (docs/capacity.md, "Per-call figures")
CHUNK_MS = 128
AUDIO_RECORDS_PER_CALL_S = 2 * 1000 / CHUNK_MS  # two tracks of 128 ms chunks: 15.625
AUDIO_RECORD_BYTES = 2162 + 36  # Avro single-object AudioChunkCaptured v2 + ContactId key
# The sample call (48.5 s) through the transcriber, offline engine, partials on: 35
# partials and 12 finals, 145 B per TranscriptSegmentProduced record on average.
TRANSCRIPT_PARTIALS_PER_CALL_S = 35 / 48.5
TRANSCRIPT_FINALS_PER_CALL_S = 12 / 48.5
TRANSCRIPT_RECORD_BYTES = 145 + 36
INGEST_PROGRESS_WRITES_PER_CALL_S = 63 / 60  # docs/ingest.md: 63 items for a 60 s call
INGEST_CALLS_PER_VCPU = 580  # README: 0.17 % of a core per call (200 calls, real time)
INGEST_CALLS_PER_TASK = 200  # CALLSTREAM_MAX_CALLS default
OFFLINE_TRACKS_PER_VCPU = 6  # README: 12 live tracks per 2-core transcriber, partials on
WAV_BYTES_PER_CALL_S = SAMPLE_RATE * BYTES_PER_SAMPLE * 2  # stereo (RECORDINGS_FORMAT=stereo)
S3_PART_BYTES = 5 * MIB  # the recorder's multipart parts
S3_PUTS_PER_CALL = 4  # CreateMultipartUpload, head object, part 1 with the header, Complete
S3_GETS_PER_CALL = 1  # the head read back before part 1 is uploaded
LEASE_S = 10.0  # CALLSTREAM_LEASE_MS default: a renewal every third of it
CHECKPOINTS_PER_SHARD_S = 1.0  # at most, per group (service.CHECKPOINT_INTERVAL_S)

# Fargate task sizes of deploy/callstream.yaml: (vCPU, GB)
TASKS = {
    "ingest": (0.5, 1.0),
    "transcriber": (1.0, 2.0),
    "recorder": (0.5, 1.0),
    "persister": (0.25, 0.5),
}


@dataclass(frozen=True)
class Price:
    """A list price, dated, with the page it was read from (or None: not found)."""

    usd: float | None
    per: str
    source: str


READ_ON = "2026-12-05"
_KDS = "https://aws.amazon.com/kinesis/data-streams/pricing/ (provisioned tab)"
PRICES = {
    "shard_hour": Price(0.015, "shard-hour", _KDS),
    "put_payload_units": Price(0.014, "million PUT payload units", _KDS),
    "efo_consumer_shard_hour": Price(0.015, "consumer-shard-hour", _KDS),
    "efo_data": Price(0.013, "GB retrieved by fan-out", _KDS),
    "ddb_write": Price(
        0.625,
        "million write request units",
        "https://aws.amazon.com/dynamodb/pricing/on-demand/ (after the Nov 2024 cut)",
    ),
    "ddb_read": Price(
        0.125,
        "million read request units",
        "https://aws.amazon.com/dynamodb/pricing/on-demand/ (after the Nov 2024 cut)",
    ),
    "s3_put": Price(
        0.005, "1,000 PUT/COPY/POST/LIST requests", "https://aws.amazon.com/s3/pricing/"
    ),
    "s3_get": Price(0.0004, "1,000 GET requests", "https://aws.amazon.com/s3/pricing/"),
    "s3_storage": Price(
        0.023, "GB-month (S3 Standard, first 50 TB)", "https://aws.amazon.com/s3/pricing/"
    ),
    "fargate_vcpu": Price(
        0.04048, "vCPU-hour (Linux/x86)", "https://aws.amazon.com/fargate/pricing/"
    ),
    "fargate_gb": Price(0.004445, "GB-hour (Linux/x86)", "https://aws.amazon.com/fargate/pricing/"),
    "transcribe_streaming": Price(
        None,
        "audio minute (streaming, per stream)",
        "https://aws.amazon.com/transcribe/pricing/ (figure not found: pass "
        "--transcribe-usd-per-minute)",
    ),
}


@dataclass(frozen=True)
class Inputs:
    """What is planned for."""

    calls: int
    audio_consumers: int = 2
    transcript_consumers: int = 3
    read_mode: str = "polling"  # polling | efo, for every consumer group
    engine: str = "offline"  # offline | transcribe
    channel_mode: str = "per-track"  # per-track | stereo (Transcribe streams per call)
    save_partials: bool = False
    headroom: float = 0.8
    transcribe_usd_per_minute: float | None = None


@dataclass(frozen=True)
class StreamPlan:
    """One stream: its load, its shards and what sets their number."""

    name: str
    records_per_s: float
    bytes_per_s: float
    groups: int
    shards: int
    bound_by: str
    calls_per_shard: float

    @property
    def records_per_shard_s(self) -> float:
        return self.records_per_s / self.shards

    @property
    def mib_per_shard_s(self) -> float:
        return self.bytes_per_s / self.shards / MIB


@dataclass
class Plan:
    """Everything `callstream capacity` prints."""

    inputs: Inputs
    streams: list[StreamPlan]
    lease_writes_per_s: float
    lease_reads_per_s: float
    progress_writes_per_s: float
    row_writes_per_s: float
    s3_puts_per_s: float
    s3_gets_per_s: float
    wav_gb_per_call_hour: float
    tasks: dict[str, int]
    cost_per_hour: dict[str, float | None] = field(default_factory=dict)

    def cost_per_call_hour(self) -> dict[str, float | None]:
        """Each cost line divided by the calls (None: its price or figure is unknown)."""
        calls = max(1, self.inputs.calls)
        return {k: None if v is None else v / calls for k, v in self.cost_per_hour.items()}


def shards_needed(
    records_per_s: float,
    bytes_per_s: float,
    groups: int,
    read_mode: str,
    headroom: float = 0.8,
) -> tuple[int, str]:
    """Shards a stream needs for its writes and its readers' reads, and which quota binds."""
    needs = {
        "write MiB/s": bytes_per_s / (WRITE_BYTES_PER_S * headroom),
        "write records/s": records_per_s / (WRITE_RECORDS_PER_S * headroom),
    }
    if read_mode == "efo":
        needs["fan-out MiB/s"] = bytes_per_s / (FANOUT_BYTES_PER_S * headroom)
    else:
        needs["shared read MiB/s"] = groups * bytes_per_s / (READ_BYTES_PER_S * headroom)
    bound = max(needs, key=lambda k: needs[k])
    return max(1, math.ceil(needs[bound] - 1e-9)), bound


def calls_per_shard(groups: int, read_mode: str, headroom: float = 1.0) -> float:
    """Concurrent calls one audio shard carries with `groups` consumer groups."""
    per_call_bytes = AUDIO_RECORDS_PER_CALL_S * AUDIO_RECORD_BYTES
    limits = [
        WRITE_BYTES_PER_S * headroom / per_call_bytes,
        WRITE_RECORDS_PER_S * headroom / AUDIO_RECORDS_PER_CALL_S,
    ]
    if read_mode == "efo":
        limits.append(FANOUT_BYTES_PER_S * headroom / per_call_bytes)
    else:
        limits.append(READ_BYTES_PER_S * headroom / (max(1, groups) * per_call_bytes))
    return min(limits)


def _stream(
    name: str, records: float, size: float, groups: int, inputs: Inputs, calls_shard: float
) -> StreamPlan:
    shards, bound = shards_needed(
        records, records * size, groups, inputs.read_mode, inputs.headroom
    )
    return StreamPlan(name, records, records * size, groups, shards, bound, calls_shard)


def plan(inputs: Inputs) -> Plan:
    """The plan for `inputs` (see the module docstring)."""
    n = inputs.calls
    audio = _stream(
        "audio",
        n * AUDIO_RECORDS_PER_CALL_S,
        AUDIO_RECORD_BYTES,
        inputs.audio_consumers,
        inputs,
        calls_per_shard(inputs.audio_consumers, inputs.read_mode, inputs.headroom),
    )
    segments = TRANSCRIPT_PARTIALS_PER_CALL_S + TRANSCRIPT_FINALS_PER_CALL_S
    transcripts = _stream(
        "transcripts",
        n * segments,
        TRANSCRIPT_RECORD_BYTES,
        inputs.transcript_consumers,
        inputs,
        0.0,
    )
    calls = StreamPlan("calls", 0.0, 0.0, 1, 1, "one shard is plenty", 0.0)
    streams = [calls, audio, transcripts]
    result = Plan(
        inputs=inputs,
        streams=streams,
        lease_writes_per_s=_lease_writes(streams),
        lease_reads_per_s=_lease_reads(streams),
        progress_writes_per_s=n
        * (INGEST_PROGRESS_WRITES_PER_CALL_S + min(1.0, TRANSCRIPT_FINALS_PER_CALL_S)),
        row_writes_per_s=n * _rows_per_call_s(inputs),
        s3_puts_per_s=n * _s3_puts_per_call_s(),
        s3_gets_per_s=n * S3_GETS_PER_CALL / _call_seconds(),
        wav_gb_per_call_hour=WAV_BYTES_PER_CALL_S * 3600 / GIB,
        tasks=_tasks(inputs),
    )
    result.cost_per_hour = _costs(result)
    return result


def _rows_per_call_s(inputs: Inputs) -> float:
    partials = TRANSCRIPT_PARTIALS_PER_CALL_S if inputs.save_partials else 0.0
    return TRANSCRIPT_FINALS_PER_CALL_S + partials


MEAN_CALL_MINUTES = 5.0  # for per-call (not per-second) requests: a plan assumption


def _call_seconds() -> float:
    return MEAN_CALL_MINUTES * 60


def _s3_puts_per_call_s() -> float:
    parts = math.ceil(WAV_BYTES_PER_CALL_S * _call_seconds() / S3_PART_BYTES)
    return (S3_PUTS_PER_CALL + max(0, parts - 1)) / _call_seconds()


def _lease_writes(streams: list[StreamPlan]) -> float:
    per_shard_group = 3 / LEASE_S + CHECKPOINTS_PER_SHARD_S
    return sum(s.shards * s.groups * per_shard_group for s in streams)


def _lease_reads(streams: list[StreamPlan]) -> float:
    # Every instance scans its group's leases every heartbeat (one consistent read unit
    # per 4 KB; a group's leases fit in one until hundreds of shards): at most one
    # instance per shard and group.
    return sum(s.shards * s.groups * 3 / LEASE_S for s in streams)


def _tasks(inputs: Inputs) -> dict[str, int]:
    n = inputs.calls
    vcpu, _ = TASKS["ingest"]
    ingest = math.ceil(n / min(INGEST_CALLS_PER_TASK, INGEST_CALLS_PER_VCPU * vcpu))
    tasks = {"ingest": max(1, ingest), "recorder": 1, "persister": 1}
    if inputs.engine == "offline":
        vcpu, _ = TASKS["transcriber"]
        tasks["transcriber"] = max(1, math.ceil(2 * n / (OFFLINE_TRACKS_PER_VCPU * vcpu)))
    else:
        tasks["transcriber"] = 1  # CPU per call with Transcribe not measured: a floor
    return tasks


def _price(name: str) -> float | None:
    return PRICES[name].usd


def _costs(p: Plan) -> dict[str, float | None]:
    inputs = p.inputs
    shards = sum(s.shards for s in p.streams) + 2  # + dead letters, recordings: one each
    units = sum(s.records_per_s * _units(s) for s in p.streams if s.records_per_s)
    costs: dict[str, float | None] = {
        "kinesis shard-hours": shards * _req(_price("shard_hour")),
        "kinesis PUT payload units": units * 3600 / 1e6 * _req(_price("put_payload_units")),
    }
    if inputs.read_mode == "efo":
        consumer_shards = sum(s.shards * s.groups for s in p.streams[1:])
        gib = sum(s.bytes_per_s * s.groups for s in p.streams[1:]) * 3600 / GIB
        costs["fan-out consumer-shard-hours"] = consumer_shards * _req(
            _price("efo_consumer_shard_hour")
        )
        costs["fan-out data"] = gib * _req(_price("efo_data"))
    writes = p.lease_writes_per_s + p.progress_writes_per_s + p.row_writes_per_s
    costs["dynamodb writes"] = writes * 3600 / 1e6 * _req(_price("ddb_write"))
    costs["dynamodb reads"] = p.lease_reads_per_s * 3600 / 1e6 * _req(_price("ddb_read"))
    costs["s3 requests"] = p.s3_puts_per_s * 3600 / 1000 * _req(
        _price("s3_put")
    ) + p.s3_gets_per_s * 3600 / 1000 * _req(_price("s3_get"))
    costs["s3 storage, per month kept"] = (
        inputs.calls * p.wav_gb_per_call_hour * _req(_price("s3_storage"))
    )
    fargate = 0.0
    for service, count in p.tasks.items():
        vcpu, gb = TASKS[service]
        fargate += count * (vcpu * _req(_price("fargate_vcpu")) + gb * _req(_price("fargate_gb")))
    costs["fargate"] = fargate
    if inputs.engine == "transcribe":
        per_minute = inputs.transcribe_usd_per_minute
        streams = 1 if inputs.channel_mode == "stereo" else 2
        costs["amazon transcribe"] = (
            None if per_minute is None else inputs.calls * 60 * streams * per_minute
        )
    return costs


def _units(stream: StreamPlan) -> int:
    """PUT payload units per record of a stream (25 KB each, at least one)."""
    return max(1, math.ceil(stream.bytes_per_s / stream.records_per_s / PUT_PAYLOAD_UNIT))


def _req(value: float | None) -> float:
    if value is None:
        raise ValueError("a price this line needs was not found")
    return value


# --- the command -----------------------------------------------------------------------
def register(commands: Any) -> None:
    """Add `capacity` to the command parser."""
    capacity = commands.add_parser(
        "capacity",
        help="shards, requests, instances and cost per call-hour for N concurrent calls",
        description="A capacity and cost plan from measured per-call figures, Kinesis's "
        "per-shard quotas and dated us-east-1 list prices (docs/capacity.md). No AWS call.",
    )
    capacity.add_argument("--calls", type=int, required=True, help="concurrent calls")
    capacity.add_argument("--audio-consumers", type=int, default=2, help="groups on audio")
    capacity.add_argument(
        "--transcript-consumers", type=int, default=3, help="groups on transcripts"
    )
    capacity.add_argument("--read-mode", choices=("polling", "efo"), default="polling")
    capacity.add_argument("--engine", choices=("offline", "transcribe"), default="offline")
    capacity.add_argument("--channel-mode", choices=("per-track", "stereo"), default="per-track")
    capacity.add_argument("--save-partials", action="store_true", help="partial rows too")
    capacity.add_argument(
        "--headroom", type=float, default=0.8, help="share of a shard's quotas to plan for"
    )
    capacity.add_argument(
        "--transcribe-usd-per-minute",
        type=float,
        default=None,
        help="Amazon Transcribe streaming price per audio minute (no default: not found)",
    )
    capacity.add_argument("--json", action="store_true", help="the plan as JSON")
    capacity.set_defaults(run=_capacity)


def _capacity(args: argparse.Namespace) -> int:
    if args.calls < 1 or not 0 < args.headroom <= 1:
        print("callstream capacity: --calls >= 1 and 0 < --headroom <= 1", file=sys.stderr)
        return 2
    inputs = Inputs(
        calls=args.calls,
        audio_consumers=args.audio_consumers,
        transcript_consumers=args.transcript_consumers,
        read_mode=args.read_mode,
        engine=args.engine,
        channel_mode=args.channel_mode,
        save_partials=args.save_partials,
        headroom=args.headroom,
        transcribe_usd_per_minute=args.transcribe_usd_per_minute,
    )
    result = plan(inputs)
    if args.json:
        print(json.dumps(as_json(result), indent=2))
    else:
        print(render(result))
    return 0


def as_json(p: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    return {
        "inputs": asdict(p.inputs),
        "streams": [
            {
                **asdict(s),
                "records_per_shard_s": s.records_per_shard_s,
                "mib_per_shard_s": s.mib_per_shard_s,
            }
            for s in p.streams
        ],
        "dynamodb": {
            "lease_writes_per_s": p.lease_writes_per_s,
            "lease_reads_per_s": p.lease_reads_per_s,
            "progress_writes_per_s": p.progress_writes_per_s,
            "row_writes_per_s": p.row_writes_per_s,
        },
        "s3": {
            "puts_per_s": p.s3_puts_per_s,
            "gets_per_s": p.s3_gets_per_s,
            "wav_gb_per_call_hour": p.wav_gb_per_call_hour,
        },
        "tasks": p.tasks,
        "cost_per_hour_usd": p.cost_per_hour,
        "cost_per_call_hour_usd": p.cost_per_call_hour(),
        "prices": {k: {**asdict(v), "read_on": READ_ON} for k, v in PRICES.items()},
    }


def render(p: Plan) -> str:
    """The plan as the text `callstream capacity` prints."""
    i = p.inputs
    lines = [
        f"{i.calls} concurrent calls; {i.audio_consumers} audio and {i.transcript_consumers} "
        f"transcript consumer groups reading by {i.read_mode}; planned at "
        f"{i.headroom:.0%} of each shard's quotas",
        "",
        "stream        shards  records/s/shard  MiB/s/shard  bound by",
    ]
    for s in p.streams:
        lines.append(
            f"{s.name:<13} {s.shards:>6}  {s.records_per_shard_s:>15.1f}  "
            f"{s.mib_per_shard_s:>11.3f}  {s.bound_by}"
        )
    audio = p.streams[1]
    lines += [
        f"one audio shard carries {audio.calls_per_shard:.1f} calls "
        f"({calls_per_shard(i.audio_consumers, i.read_mode):.1f} at 100 % of its quotas)",
        "",
        f"DynamoDB: lease table {p.lease_writes_per_s:.1f} writes/s and "
        f"{p.lease_reads_per_s:.1f} reads/s; progress table {p.progress_writes_per_s:.1f} "
        f"writes/s; transcript rows {p.row_writes_per_s:.1f} writes/s",
        f"S3: {p.s3_puts_per_s:.2f} PUT-class and {p.s3_gets_per_s:.3f} GET requests/s "
        f"(calls of {MEAN_CALL_MINUTES:g} min); {p.wav_gb_per_call_hour:.3f} GB of WAV per "
        "call-hour",
        "Fargate tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(p.tasks.items())),
        "",
        f"cost per call-hour (USD, us-east-1 list prices read {READ_ON}):",
    ]
    per_call = p.cost_per_call_hour()
    known = 0.0
    for name, value in per_call.items():
        text = "n/a (price not found)" if value is None else f"{value:.5f}"
        lines.append(f"  {name:<32} {text}")
        if value is not None and "per month kept" not in name:
            known += value
    lines.append(f"  {'total (without storage)':<32} {known:.5f}")
    return "\n".join(lines)
