"""The sentiment service's AWS adapters: its DynamoDB table and the configured scorer.

AWS errors are classified where they enter (`callstream.awserrors`): retry,
dead-letter the segment, or stop. The Comprehend scorer classifies its own
(`engines.ComprehendScorer`).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream.awserrors import classify
from services.sentiment.core import Scorer
from services.sentiment.settings import SentimentSettings


class SentimentTable:
    """The sentiment rows' table over a boto3 DynamoDB resource."""

    def __init__(self, dynamodb: Any, name: str) -> None:
        self.table = dynamodb.Table(name)
        self.name = name

    def put(self, item: dict[str, Any]) -> None:
        """One PutItem; raises the classified error."""
        try:
            self.table.put_item(Item=item)
        except (ClientError, BotoCoreError) as e:
            raise classify(e, what=f"DynamoDB put to {self.name}") from e


def ensure_table(dynamodb_client: Any, name: str) -> None:
    """Create the sentiment table (ContactId hash, SegmentId range) if missing."""
    aws.ensure_table(dynamodb_client, name, ("ContactId", "S"), ("SegmentId", "S"))


def make_scorer(settings: SentimentSettings) -> Scorer:
    """The configured engine."""
    if settings.engine == "comprehend":
        from services.sentiment.engines import ComprehendScorer

        return ComprehendScorer(aws.client("comprehend", settings.comprehend_region))
    from services.sentiment.engines import VaderScorer

    return VaderScorer()
