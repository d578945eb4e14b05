"""The sentiment consumer as an AWS Lambda function on the transcripts stream.

Handler: `services.sentiment.lambda_function.lambda_handler`. The same
settings (`SentimentSettings`) and `SentimentHandler` as the Fargate service,
run per batch by `callstream.lambda_consumer`. The scorer (VADER's lexicon, or
a Comprehend client) is loaded once per execution environment; the table comes
from the stack.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from callstream import aws
from callstream import log as logsetup
from callstream.bus.kinesis import KinesisPublisher
from callstream.lambda_consumer import KinesisBatchConsumer
from services.sentiment.core import Scorer
from services.sentiment.engines import ComprehendScorer, VaderScorer
from services.sentiment.handler import SentimentHandler
from services.sentiment.settings import SentimentSettings

DEADLETTER_DEADLINE_S = 20.0


@cache
def consumer() -> KinesisBatchConsumer:
    """Built on the first invocation, reused while the execution environment lives."""
    logsetup.configure("sentiment")
    settings = SentimentSettings.from_env()
    region = settings.bus.region
    dynamodb = aws.session(region).resource("dynamodb", config=aws.client_config())
    scorer = _scorer(settings)
    deadletters = KinesisPublisher(
        aws.client("kinesis", region),
        settings.bus.deadletter_stream,
        deadline_s=DEADLETTER_DEADLINE_S,
    )
    return KinesisBatchConsumer(
        "sentiment", lambda: SentimentHandler(settings, scorer, dynamodb), deadletters
    )


def _scorer(settings: SentimentSettings) -> Scorer:
    """As `make_scorer`, but imported at module level, so the zip's import closure has both."""
    if settings.engine == "comprehend":
        return ComprehendScorer(aws.client("comprehend", settings.comprehend_region))
    return VaderScorer()


def lambda_handler(event: dict[str, Any], context: Any = None) -> Any:
    """One Kinesis batch in, `{"batchItemFailures": [...]}` out."""
    return consumer()(event, context)
