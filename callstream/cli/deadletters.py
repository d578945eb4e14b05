"""`callstream deadletters list|redrive`: the records the services could not process."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from callstream.cli.common import CliError, aws_client, aws_options, bus_settings


def register(commands: Any) -> None:
    """Add `deadletters list` and `deadletters redrive` to the command parser."""
    letters = commands.add_parser("deadletters", help="records the services could not process")
    sub = letters.add_subparsers(dest="deadletters_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="list dead letters")
    listing.add_argument("--since-minutes", type=float, default=24 * 60.0)
    listing.add_argument("--service", help="only this service's")
    listing.add_argument("--reason", help="only letters whose reason contains this")
    listing.add_argument("--json", action="store_true", help="JSON lines")
    aws_options(listing)
    listing.set_defaults(run=_deadletters_list)
    redrive = sub.add_parser(
        "redrive",
        help="put dead letters back on their source stream (each original record once)",
    )
    redrive.add_argument("--service", help="only this service's")
    redrive.add_argument("--reason", help="only letters whose reason contains this")
    redrive.add_argument(
        "--dry-run", action="store_true", help="say what would be put back, put nothing"
    )
    aws_options(redrive)
    redrive.set_defaults(run=_deadletters_redrive)


def _deadletters_list(args: argparse.Namespace) -> int:
    from callstream.deadletters import list_dead_letters

    since_ms = int(time.time() * 1000) - int(args.since_minutes * 60_000)
    entries = list_dead_letters(
        aws_client("kinesis"),
        bus_settings().deadletter_stream,
        service=args.service,
        reason=args.reason,
    )
    entries = [e for e in entries if e.letter.failed_at_ms >= since_ms]
    for entry in entries:
        letter = entry.letter
        if args.json:
            fields = {k: v for k, v in asdict(letter).items() if k != "data"}
            print(json.dumps({"id": entry.id, **fields, "bytes": len(letter.data)}))
        else:
            when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC).isoformat()
            print(f"{entry.id} {when} {letter.service:<12} {entry.original}: {letter.reason}")
    if not args.json:
        print(f"{len(entries)} dead letter(s)", file=sys.stderr)
    return 0


def _deadletters_redrive(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("callstream.deadletters")
    except ModuleNotFoundError:
        raise CliError(
            "redrive needs callstream.deadletters, which is not in this installation"
        ) from None
    bus = bus_settings()
    report = module.redrive(
        aws_client("kinesis"),
        aws_client("dynamodb"),
        deadletter_stream=bus.deadletter_stream,
        ledger_table=bus.lease_table,
        service=args.service,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    print(json.dumps({"dry_run": args.dry_run, **asdict(report)}))
    return 0
