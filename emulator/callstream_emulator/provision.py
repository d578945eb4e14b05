"""Create the streams, tables and bucket the services use (local runs and tests).

On AWS the infrastructure template owns these; locally the embedded emulator
starts empty, so `callstream local up`, the demo and the test fixtures call
`provision()` with the same settings the services read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from callstream import aws
from callstream.config import BusSettings, Env, recordings_stream
from callstream.service import ensure_stream
from services.persister.adapters import ensure_tables
from services.persister.settings import PersisterSettings

DEFAULT_BUCKET = "callstream-recordings-local"


def provision(environ: Mapping[str, str], audio_shards: int = 2) -> dict[str, str]:
    """Create every resource named by `environ` (idempotent); return their names."""
    env = Env(environ)
    bus = BusSettings.from_env(env)
    persister = PersisterSettings.from_env(environ)
    bucket = env.text("RECORDINGS_BUCKET_NAME", DEFAULT_BUCKET)
    kinesis = aws.client("kinesis", bus.region)
    for stream, shards in (
        (bus.calls_stream, audio_shards),  # so several ingest instances share new calls
        (bus.audio_stream, audio_shards),
        (bus.transcripts_stream, audio_shards),
        (bus.deadletter_stream, 1),
        (recordings_stream(env), 1),
    ):
        ensure_stream(kinesis, stream, shards)
    ensure_tables(
        aws.client("dynamodb", bus.region), [persister.customer_table, persister.agent_table]
    )
    s3 = aws.client("s3", bus.region)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    return {
        "calls_stream": bus.calls_stream,
        "audio_stream": bus.audio_stream,
        "transcripts_stream": bus.transcripts_stream,
        "deadletter_stream": bus.deadletter_stream,
        "recordings_stream": recordings_stream(env),
        "customer_table": persister.customer_table,
        "agent_table": persister.agent_table,
        "bucket": bucket,
    }
