"""Sentiment core: final TranscriptSegmentProduced in, one sentiment row per segment out.

Pure: the scorer is passed in (offline lexicon or Amazon Comprehend, see
`engines.py`). A row's key is (ContactId, SegmentId), both taken from the
segment, so a replayed segment rewrites the same row.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from callstream.events import Event, TranscriptSegmentProduced

LABELS = ("POSITIVE", "NEGATIVE", "NEUTRAL", "MIXED")


@dataclass(frozen=True)
class Sentiment:
    """A label (one of LABELS) and the score of each label, 0..1."""

    label: str
    positive: float
    negative: float
    neutral: float
    mixed: float = 0.0


class Scorer(Protocol):
    """Anything that rates a sentence's sentiment."""

    name: str

    def score(self, text: str, language_code: str) -> Sentiment:
        """The sentiment of `text` (language as `en-US`)."""


@dataclass(frozen=True)
class SentimentRow:
    """One DynamoDB item to put."""

    table: str
    item: dict[str, Any]


def row_for(
    event: Event, scorer: Scorer, table: str, ttl_days: int, now_ms: int
) -> list[SentimentRow]:
    """The row a final, non-empty segment gets; nothing for partials or other events."""
    if not isinstance(event, TranscriptSegmentProduced) or event.is_partial:
        return []
    if not event.transcript.strip():
        return []
    sentiment = scorer.score(event.transcript, event.language_code or "en-US")
    return [SentimentRow(table, sentiment_item(event, sentiment, scorer.name, ttl_days, now_ms))]


def sentiment_item(
    event: TranscriptSegmentProduced, sentiment: Sentiment, engine: str, ttl_days: int, now_ms: int
) -> dict[str, Any]:
    """The item (boto3 resource-style values) of one scored segment."""
    return {
        "ContactId": event.contact_id,
        "SegmentId": event.segment_id,
        "Track": event.track.value,
        "Speaker": event.track.speaker,
        "StartTime": Decimal(event.start_ms) / 1000,
        "EndTime": Decimal(event.end_ms) / 1000,
        "Transcript": event.transcript,
        "Sentiment": sentiment.label,
        "Positive": _decimal(sentiment.positive),
        "Negative": _decimal(sentiment.negative),
        "Neutral": _decimal(sentiment.neutral),
        "Mixed": _decimal(sentiment.mixed),
        "Engine": engine,
        "ExpiresAfter": now_ms // 1000 + ttl_days * 86_400,
    }


def _decimal(value: float) -> Decimal:
    return Decimal(str(round(value, 4)))
