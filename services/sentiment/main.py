"""Sentiment service: the transcripts stream -> one sentiment row per final segment.

A new consumer added without touching the other services: it reads the
transcripts stream under its own lease group (`sentiment`), so it gets every
record the persister gets, and writes to its own table. See docs/add-a-consumer.md.

Wiring only: settings -> scorer and table -> `handler.SentimentHandler` -> `run_service`.
"""

from __future__ import annotations

from callstream import aws
from callstream import log as logsetup
from callstream.service import load_settings, run_service
from services.sentiment.adapters import ensure_table, make_scorer
from services.sentiment.handler import SentimentHandler
from services.sentiment.settings import SentimentSettings


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
