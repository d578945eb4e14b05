"""`callstream trigger EVENT`: run the ingest trigger Lambda on one event."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from callstream.cli.common import CliError, aws_options


def register(commands: Any) -> None:
    """Add `trigger` to the command parser."""
    trigger = commands.add_parser("trigger", help="publish CallStarted for a trigger event")
    trigger.add_argument("event", help="the event as JSON, or @file.json")
    aws_options(trigger)
    trigger.set_defaults(run=_trigger)


def _trigger(args: argparse.Namespace) -> int:
    from services.ingest.lambda_function import lambda_handler

    text = Path(args.event[1:]).read_text() if args.event.startswith("@") else args.event
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"the event is not JSON: {e}") from e
    answer = lambda_handler(event)
    print(json.dumps(answer))
    return 0 if answer["status"] == "accepted" else 1
