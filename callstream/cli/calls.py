"""`callstream calls`: active calls and their lag, folded from the audio and transcripts streams."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from callstream.cli.common import aws_client, aws_options, bus_settings


def register(commands: Any) -> None:
    """Add `calls` to the command parser."""
    calls = commands.add_parser(
        "calls",
        help="active calls and their lag, from the audio and transcripts streams",
        description="CAPTURE LAG: now minus the end of the newest audio chunk (how far ingest "
        "is behind the live call). TRANSCRIPT LAG: audio captured minus audio transcribed. "
        "On the embedded emulator, a last line counts the Kinesis requests its per-shard "
        "quotas throttled, per stream of the bus.",
    )
    calls.add_argument("--since-minutes", type=float, default=60.0, help="how far back to read")
    calls.add_argument("--all", action="store_true", help="ended calls too")
    calls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    aws_options(calls)
    calls.set_defaults(run=_calls)


def read_since(kinesis: Any, stream: str, since_ms: int) -> Iterator[Any]:
    """Every decodable event of `stream` written since `since_ms`, shard by shard, to now."""
    from callstream.contract import default_contract
    from callstream.errors import PoisonRecordError

    contract = default_contract()
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream,
            ShardId=shard["ShardId"],
            ShardIteratorType="AT_TIMESTAMP",
            Timestamp=datetime.fromtimestamp(since_ms / 1000, UTC),
        )["ShardIterator"]
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
            for record in page["Records"]:
                with contextlib.suppress(PoisonRecordError):
                    yield contract.decode(record["Data"])
            iterator = page.get("NextShardIterator")
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break


@dataclass
class CallView:
    """What the streams say about one call."""

    contact_id: str
    started_ms: int | None = None
    captured_ms: int = 0
    captured_until_ms: int | None = None
    transcribed_ms: int = 0
    ended: str | None = None

    def row(self, now_ms: int) -> dict[str, Any]:
        """The call as a dict with its lags in seconds."""
        capture_lag = None
        if self.captured_until_ms is not None and self.ended is None:
            capture_lag = round((now_ms - self.captured_until_ms) / 1000, 1)
        return {
            **asdict(self),
            "capture_lag_s": capture_lag,
            "transcript_lag_s": round(max(0, self.captured_ms - self.transcribed_ms) / 1000, 1),
        }


def collect_calls(kinesis: Any, bus: Any, since_ms: int) -> dict[str, CallView]:
    """Fold the audio and transcripts streams into one view per call."""
    from callstream.events import AudioChunkCaptured, CallEnded, CallStarted
    from callstream.events import TranscriptSegmentProduced as Segment

    calls: dict[str, CallView] = {}
    for stream in (bus.audio_stream, bus.transcripts_stream):
        for event in read_since(kinesis, stream, since_ms):
            contact = getattr(event, "contact_id", None)
            if contact is None:
                continue
            view = calls.setdefault(contact, CallView(contact))
            if isinstance(event, CallStarted):
                view.started_ms = event.requested_at_ms
            elif isinstance(event, AudioChunkCaptured):
                length_ms = len(event.pcm) // 16
                view.captured_ms = max(view.captured_ms, event.offset_ms + length_ms)
                until = event.start_time_ms + length_ms
                view.captured_until_ms = max(view.captured_until_ms or 0, until)
            elif isinstance(event, Segment):
                view.transcribed_ms = max(view.transcribed_ms, event.end_ms)
            elif isinstance(event, CallEnded):
                view.ended = event.reason.value
    return calls


def _calls(args: argparse.Namespace) -> int:
    bus = bus_settings()
    now_ms = int(time.time() * 1000)
    since_ms = now_ms - int(args.since_minutes * 60_000)
    calls = collect_calls(aws_client("kinesis"), bus, since_ms)
    rows = [v.row(now_ms) for v in calls.values() if args.all or v.ended is None]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    _print_calls(rows, sys.stdout)
    control_url = os.environ.get("CALLSTREAM_EMULATOR_CONTROL_URL")
    if control_url:
        sys.stdout.write(throttle_line(control_url, bus) + "\n")
    return 0


def throttle_line(control_url: str, bus: Any) -> str:
    """The emulator's Kinesis throttle counts for the bus's streams, as one line."""
    from callstream_emulator.faults import remote_snapshot

    head = "kinesis throttles (emulator"
    try:
        quotas = remote_snapshot(control_url, timeout=2.0).get("kinesis_quotas")
    except (OSError, ValueError) as e:
        return f"{head}): unknown, the control route did not answer ({e})"
    if not isinstance(quotas, dict):
        return f"{head}): not counted by this emulator"
    head += f", per-shard quotas {'on' if quotas.get('enabled') else 'OFF'})"
    streams = (bus.calls_stream, bus.audio_stream, bus.transcripts_stream, bus.deadletter_stream)
    counts: dict[str, dict[str, int]] = {}
    for entry in quotas.get("throttles", []):
        if entry.get("stream") in streams:
            per_stream = counts.setdefault(entry["stream"], {})
            per_stream[entry["operation"]] = per_stream.get(entry["operation"], 0) + entry["count"]
    if not counts:
        return f"{head}: none"
    parts = [
        f"{stream} " + ", ".join(f"{op} {n}" for op, n in sorted(ops.items()))
        for stream, ops in sorted(counts.items())
    ]
    return f"{head}: " + "; ".join(parts)


def _print_calls(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = (
        f"{'CONTACT':<38} {'STATE':<16} {'CAPTURED':>9} {'CAPTURE LAG':>12} {'TRANSCRIPT LAG':>15}"
    )
    out.write(header + "\n")
    for row in rows:
        lag = "-" if row["capture_lag_s"] is None else f"{row['capture_lag_s']:.1f}s"
        state = row["ended"] or "in progress"
        out.write(
            f"{row['contact_id']:<38} {state:<16} {row['captured_ms'] / 1000:>8.1f}s "
            f"{lag:>12} {row['transcript_lag_s']:>14.1f}s\n"
        )
    if not rows:
        out.write("(no calls)\n")
