"""Sentiment service: the transcripts stream -> one sentiment row per final segment.

A new consumer added without touching the other services: it reads the
transcripts stream under its own lease group (`sentiment`), so it gets every
record the persister gets, and writes to its own table. See docs/add-a-consumer.md.

AWS errors of the scorer (Comprehend) and the table are classified where they
enter (`callstream.awserrors`): retry, dead-letter the segment, or stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream import log as logsetup
from callstream.awserrors import classify
from callstream.bus.ports import Record
from callstream.config import BusSettings, Env
from callstream.events import Event
from callstream.service import load_settings, run_service
from services.sentiment.core import Scorer, row_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SentimentSettings:
    """Where rows go and which engine scores them."""

    bus: BusSettings
    engine: str
    table: str
    comprehend_region: str
    ttl_days: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SentimentSettings:
        """CALLSTREAM_SENTIMENT_ENGINE, CALLSTREAM_SENTIMENT_TABLE, COMPREHEND_REGION."""
        env = Env(environ)
        bus = BusSettings.from_env(env)
        return cls(
            bus=bus,
            engine=env.choice("CALLSTREAM_SENTIMENT_ENGINE", "offline", ("offline", "comprehend")),
            table=env.name("CALLSTREAM_SENTIMENT_TABLE", "callstream-sentiment"),
            comprehend_region=env.region("COMPREHEND_REGION", bus.region),
            ttl_days=env.integer("CALLSTREAM_TRANSCRIPT_TTL_DAYS", 7, minimum=1),
        )


class SentimentHandler:
    """Scores each final segment and writes its row before the record is checkpointed."""

    def __init__(
        self,
        settings: SentimentSettings,
        scorer: Scorer,
        dynamodb: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.table = dynamodb.Table(settings.table)
        self.clock = clock  # ExpiresAfter of the rows

    def handle(self, event: Event, record: Record) -> None:
        now_ms = int(self.clock() * 1000)
        try:
            rows = row_for(event, self.scorer, self.settings.table, self.settings.ttl_days, now_ms)
        except (ClientError, BotoCoreError) as e:  # the Comprehend scorer lets these through
            raise classify(e, what=f"scoring with {self.scorer.name}") from e
        for row in rows:
            try:
                self.table.put_item(Item=row.item)
            except (ClientError, BotoCoreError) as e:
                raise classify(e, what=f"DynamoDB put to {row.table}") from e

    def is_settled(self, contact_id: str) -> bool:
        return True

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None


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


def main() -> None:
    """Entry point: `python -m services.sentiment.main`."""
    logsetup.configure("sentiment")
    settings = load_settings(SentimentSettings.from_env)
    region = settings.bus.region
    ensure_table(aws.client("dynamodb", region), settings.table)
    resource = aws.session(region).resource("dynamodb", config=aws.client_config())
    handler = SentimentHandler(settings, make_scorer(settings), resource)
    run_service("sentiment", settings.bus, settings.bus.transcripts_stream, handler)


if __name__ == "__main__":
    main()
