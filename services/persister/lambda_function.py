"""The persister as an AWS Lambda function on the transcripts stream (Kinesis event source mapping).

Handler: `services.persister.lambda_function.lambda_handler`. The same
settings as the Fargate service (`PersisterSettings`: table names, partials,
TTL) and the same `PersisterHandler`, run per batch by
`callstream.lambda_consumer`: the batch's finals are written with
BatchWriteItem before the response, and a batch the tables do not accept in
time is reported from its first unwritten record, so the mapping retries it.
The tables come from the stack; the function creates nothing.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from callstream import aws
from callstream import log as logsetup
from callstream.bus.kinesis import KinesisPublisher
from callstream.lambda_consumer import KinesisBatchConsumer
from services.persister.handler import PersisterHandler
from services.persister.settings import PersisterSettings

# Throttled writes are retried within an invocation for at most this long, then
# reported as batch item failures: well inside the function's timeout.
FLUSH_DEADLINE_S = 20.0


@cache
def consumer() -> KinesisBatchConsumer:
    """Built on the first invocation, reused while the execution environment lives."""
    logsetup.configure("persister")
    settings = PersisterSettings.from_env()
    region = settings.bus.region
    dynamodb = aws.session(region).resource("dynamodb", config=aws.client_config())

    def make_handler() -> PersisterHandler:
        handler = PersisterHandler(settings, dynamodb)
        handler.deadline_s = FLUSH_DEADLINE_S
        return handler

    deadletters = KinesisPublisher(
        aws.client("kinesis", region), settings.bus.deadletter_stream, deadline_s=FLUSH_DEADLINE_S
    )
    return KinesisBatchConsumer("persister", make_handler, deadletters)


def lambda_handler(event: dict[str, Any], context: Any = None) -> Any:
    """One Kinesis batch in, `{"batchItemFailures": [...]}` out."""
    return consumer()(event, context)
