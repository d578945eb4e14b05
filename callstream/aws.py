"""boto3 clients, made one way for every service.

Where requests go is configuration only: boto3 itself reads
`AWS_ENDPOINT_URL` (LocalStack, the embedded emulator) or uses the real
endpoints, and the standard credentials chain. Retries use botocore's
adaptive mode so throttling backs off with jitter before our own code sees it.
"""

from __future__ import annotations

import contextlib
import threading
from functools import cache
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

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


def ensure_table(
    dynamodb: Any,
    name: str,
    hash_key: tuple[str, str],
    range_key: tuple[str, str] | None = None,
    ttl_attribute: str | None = None,
) -> None:
    """Create an on-demand table if it does not exist (keys as (name, S|N|B)).

    Looks first, so a deployment whose template made the table needs no
    CreateTable permission; tolerates another instance creating it meanwhile.
    """
    try:
        status = dynamodb.describe_table(TableName=name)["Table"]["TableStatus"]
    except dynamodb.exceptions.ResourceNotFoundException:
        status = None
    if status == "ACTIVE":
        return
    keys = [(hash_key, "HASH")] + ([(range_key, "RANGE")] if range_key else [])
    # another instance may create it first
    with contextlib.suppress(dynamodb.exceptions.ResourceInUseException):
        dynamodb.create_table(
            TableName=name,
            KeySchema=[{"AttributeName": k[0], "KeyType": kind} for k, kind in keys],
            AttributeDefinitions=[{"AttributeName": k[0], "AttributeType": k[1]} for k, _ in keys],
            BillingMode="PAY_PER_REQUEST",
        )
    dynamodb.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 300}
    )
    if ttl_attribute:
        try:
            dynamodb.update_time_to_live(
                TableName=name,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl_attribute},
            )
        except ClientError as e:  # the instance that won the creation race enabled it first
            if "already enabled" not in str(e):
                raise
