"""boto3 clients, made one way for every service.

Where requests go is configuration only: boto3 itself reads
`AWS_ENDPOINT_URL` (LocalStack, the embedded emulator) or uses the real
endpoints, and the standard credentials chain. Retries use botocore's
adaptive mode so throttling backs off with jitter before our own code sees it.
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import boto3
from botocore.config import Config

_RETRIES = Config(
    retries={"mode": "adaptive", "max_attempts": 8},
    connect_timeout=5,
    read_timeout=30,
    max_pool_connections=64,
)


@cache
def session(region: str) -> boto3.session.Session:
    """One boto3 session per region and process (clients are thread-safe)."""
    return boto3.session.Session(region_name=region)


def client_config() -> Config:
    """The retry and timeout policy, for boto3 resources."""
    return _RETRIES


_LOCK = threading.Lock()  # boto3 sessions are not thread-safe when making clients


def client(service: str, region: str, endpoint_url: str | None = None, **config: Any) -> Any:
    """A boto3 client with the project's retry and timeout policy."""
    cfg = _RETRIES.merge(Config(**config)) if config else _RETRIES
    with _LOCK:
        return session(region).client(service, endpoint_url=endpoint_url, config=cfg)
