"""`callstream` command line: local emulator, demo, replay, live views, dead letters, KVS dumps.

Exit codes: 0 success, 1 the work failed, 2 bad usage (or a bad setting).

Commands that talk to AWS use the ambient configuration (credentials chain,
region, `AWS_ENDPOINT_URL`); `--local` points them at the emulator started by
`callstream local up` instead, by reading its state file.
"""

# The docstring above is also the text of `callstream --help`. This module
# assembles the parser from one module per command group and runs the chosen
# command; each command module imports its heavy dependencies only when run.

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from callstream.cli import (
    calls,
    capacity,
    deadletters,
    kvs,
    liveview,
    local,
    replay,
    tail,
    trigger,
)
from callstream.cli.calls import CallView, collect_calls, read_since
from callstream.cli.common import CliError, adopt_local
from callstream.cli.kvs import ContactGate, TrackFiles
from callstream.cli.replay import _wav_tracks
from callstream.cli.tail import format_segment

__all__ = [
    "CallView",
    "CliError",
    "ContactGate",
    "TrackFiles",
    "_parser",
    "_wav_tracks",
    "collect_calls",
    "format_segment",
    "main",
    "read_since",
]

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callstream", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # This order is the order of `callstream --help`.
    for group in (local, trigger, replay, tail, calls, deadletters, kvs, liveview, capacity):
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `callstream` command; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from callstream.errors import ConfigError

    try:
        if getattr(args, "local", False):
            adopt_local(Path(args.state_file))
        code: int = args.run(args)
        return code
    except ConfigError as e:
        print(f"callstream: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("callstream_emulator"):
            raise
        print(
            f"callstream: `{args.command}` needs the emulator, a distribution of its own: "
            "pip install ./emulator (from the project's root), or `make setup`",
            file=sys.stderr,
        )
        return 2
    except Exception as e:
        print(f"callstream: error: {_describe(e)}", file=sys.stderr)
        log.debug("command failed", exc_info=True)
        return 1


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, CliError) else f"{type(error).__name__}: {error}"
