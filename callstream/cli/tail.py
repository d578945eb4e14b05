"""`callstream tail CONTACT_ID`: a call's transcript, live, until the call ends."""

from __future__ import annotations

import argparse
import time
from typing import Any

from callstream.cli.common import CliError, aws_client, aws_options, bus_settings


def register(commands: Any) -> None:
    """Add `tail` to the command parser."""
    tail = commands.add_parser("tail", help="a call's transcript, live, until the call ends")
    tail.add_argument("contact_id", metavar="CONTACT_ID")
    tail.add_argument("--partials", action="store_true", help="print partial segments too")
    tail.add_argument("--latest", action="store_true", help="only what arrives from now on")
    tail.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    aws_options(tail)
    tail.set_defaults(run=_tail)


def _tail(args: argparse.Namespace) -> int:
    from callstream.bus.tail import StreamTail
    from callstream.events import CallEnded, TranscriptSegmentProduced

    tail = StreamTail(aws_client("kinesis"), bus_settings().transcripts_stream, latest=args.latest)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while deadline is None or time.monotonic() < deadline:
        batch = tail.poll()
        for event in batch:
            if getattr(event, "contact_id", None) != args.contact_id:
                continue
            if isinstance(event, TranscriptSegmentProduced):
                if args.partials or not event.is_partial:
                    print(format_segment(event), flush=True)
            elif isinstance(event, CallEnded):
                print(f"-- call ended: {event.reason.value}", flush=True)
                return 0
        if not batch:
            time.sleep(0.2)
    raise CliError(f"call {args.contact_id} did not end within {args.timeout:g} s")


def format_segment(segment: Any) -> str:
    """`[mm:ss.s] speaker: text` (partials marked with `~`)."""
    start = segment.start_ms
    stamp = f"[{start // 60000:02d}:{start % 60000 / 1000:04.1f}]"
    mark = "~" if segment.is_partial else ":"
    return f"{stamp} {segment.track.speaker:>8}{mark} {segment.transcript}"
