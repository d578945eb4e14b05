"""`callstream` command line: local emulator, demo, trigger.

Exit codes: 0 success, 1 the work failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callstream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    local = commands.add_parser("local", help="the embedded emulator")
    local_commands = local.add_subparsers(dest="local_command", required=True)
    up = local_commands.add_parser("up", help="start the emulator and wait (Ctrl-C stops it)")
    up.add_argument("--state-file", default=".callstream/local.json")
    up.add_argument("--port", type=int, default=4566)
    up.add_argument("--media-port", type=int, default=4567)
    demo = commands.add_parser("demo", help="run the sample call end to end on the emulator")
    demo.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    trigger = commands.add_parser("trigger", help="publish CallStarted for a trigger event")
    trigger.add_argument("event", help="the event as JSON, or @file.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `callstream` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "local":
        from callstream.local.emulator import run_forever

        run_forever(args.state_file, port=args.port, media_port=args.media_port)
        return 0
    if args.command == "demo":
        from callstream.local.demo import run_demo

        return run_demo(speed=args.speed)
    if args.command == "trigger":
        from services.ingest.handler import lambda_handler

        text = Path(args.event[1:]).read_text() if args.event.startswith("@") else args.event
        answer = lambda_handler(json.loads(text))
        print(json.dumps(answer))
        return 0 if answer["status"] == "accepted" else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
