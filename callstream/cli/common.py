"""What the command modules share: `CliError`, the `--local` options and the AWS clients.

Only the standard library is imported here, so `callstream --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_STATE_FILE = ".callstream/local.json"
# Variables that would make boto3 ignore the emulator's endpoint or credentials.
_CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


class CliError(Exception):
    """The command could not do its work; the message says why (exit code 1)."""


def aws_options(parser: argparse.ArgumentParser) -> None:
    """Add `--local` and `--state-file` to a command that talks to AWS."""
    parser.add_argument(
        "--local", action="store_true", help="use the emulator of `callstream local up`"
    )
    parser.add_argument(
        "--state-file", default=DEFAULT_STATE_FILE, help="the emulator's state file (--local)"
    )


def adopt_local(state_file: Path) -> None:
    """Point this process's boto3 at the emulator `callstream local up` started."""
    state = read_state(state_file)
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(state["env"])


def read_state(state_file: Path) -> dict[str, Any]:
    """The state file `callstream local up` wrote (its pid and environment)."""
    try:
        state: dict[str, Any] = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CliError(
            f"no emulator state file at {state_file}: run `callstream local up`"
        ) from None
    return state


def bus_settings() -> Any:
    """The stream and table names and the region, from the environment."""
    from callstream.config import BusSettings, Env

    return BusSettings.from_env(Env())


def aws_client(service: str, **kwargs: Any) -> Any:
    """A boto3 client for `service` in the bus's region."""
    from callstream import aws

    return aws.client(service, bus_settings().region, **kwargs)
