"""`callstream liveview`: serve the live call view (`services/liveview`) on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
from typing import Any

from callstream.cli.common import aws_options


def register(commands: Any) -> None:
    """Add `liveview` to the command parser."""
    liveview = commands.add_parser(
        "liveview", help="the live call view: a web page on 127.0.0.1 (Ctrl-C stops it)"
    )
    liveview.add_argument("--port", type=int, default=8080)
    liveview.add_argument("--bucket", help="recordings bucket (default RECORDINGS_BUCKET_NAME)")
    aws_options(liveview)
    liveview.set_defaults(run=_liveview)


def _liveview(args: argparse.Namespace) -> int:
    from services.liveview.main import main as liveview_main

    os.environ["CALLSTREAM_LIVEVIEW_PORT"] = str(args.port)
    if args.bucket:
        os.environ["RECORDINGS_BUCKET_NAME"] = args.bucket
    elif args.local:
        os.environ.setdefault("RECORDINGS_BUCKET_NAME", "callstream-recordings-local")
    liveview_main()
    return 0
