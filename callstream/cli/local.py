"""The embedded emulator's commands: `local up`, `local down`, `demo` (the sample call on it)."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from callstream.cli.common import DEFAULT_STATE_FILE, CliError, read_state


def register(commands: Any) -> None:
    """Add `local up`, `local down`, `demo` to the command parser."""
    local = commands.add_parser("local", help="the embedded emulator")
    sub = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="start the emulator and wait (Ctrl-C stops it)")
    up.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    up.add_argument("--port", type=int, default=4566)
    up.add_argument("--media-port", type=int, default=4567)
    up.add_argument(
        "--no-kinesis-quotas",
        dest="kinesis_quotas",
        action="store_const",
        const=False,
        default=None,
        help="do not enforce Kinesis's per-shard quotas (default: enforced, unless "
        "CALLSTREAM_EMULATOR_KINESIS_QUOTAS=off)",
    )
    up.set_defaults(run=_local_up)
    down = sub.add_parser("down", help="stop the emulator started by `local up`")
    down.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    down.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it")
    down.set_defaults(run=_local_down)
    demo = commands.add_parser("demo", help="run the sample call end to end on the emulator")
    demo.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    demo.set_defaults(run=_demo)


def _local_up(args: argparse.Namespace) -> int:
    from callstream_emulator.emulator import run_forever

    run_forever(
        args.state_file,
        port=args.port,
        media_port=args.media_port,
        kinesis_quotas=args.kinesis_quotas,
    )
    return 0


def _local_down(args: argparse.Namespace) -> int:
    path = Path(args.state_file)
    pid = int(read_state(path)["pid"])
    if not _is_emulator(pid):
        path.unlink(missing_ok=True)
        raise CliError(f"the emulator (pid {pid}) is not running; removed stale {path}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    # The emulator removes its state file as it stops (a zombie pid may linger).
    while path.exists() and _is_emulator(pid):
        if time.monotonic() > deadline:
            raise CliError(f"the emulator (pid {pid}) did not stop within {args.timeout:g} s")
        time.sleep(0.05)
    print(f"emulator (pid {pid}) stopped")
    return 0


def _is_emulator(pid: int) -> bool:
    """The pid is alive and is a callstream process (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return not Path("/proc/self").exists()  # no procfs: trust the pid
    text = cmdline.read_bytes().replace(b"\0", b" ")
    return b"callstream" in text


def _demo(args: argparse.Namespace) -> int:
    from callstream_emulator.demo import run_demo

    return run_demo(speed=args.speed)
