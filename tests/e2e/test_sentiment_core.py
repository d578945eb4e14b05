"""The sentiment consumer's core and engines, without the pipeline.

Finals get one row keyed by the segment, partials and other events none; the
offline VADER scorer labels plain English; the Comprehend scorer is exercised
against the emulator (moto answers DetectSentiment).
"""

from __future__ import annotations

from typing import Any

import pytest

from callstream.errors import ConfigError
from callstream.events import CallEnded, EndReason, Track, TranscriptSegmentProduced
from services.sentiment.core import LABELS, Sentiment, row_for
from services.sentiment.engines import ComprehendScorer, VaderScorer
from services.sentiment.settings import SentimentSettings


class FixedScorer:
    name = "fixed"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def score(self, text: str, language_code: str) -> Sentiment:
        self.texts.append(text)
        return Sentiment("POSITIVE", 0.9, 0.0, 0.1)


def _segment(text: str, partial: bool = False) -> TranscriptSegmentProduced:
    return TranscriptSegmentProduced(
        "c-1", Track.FROM_CUSTOMER, "c-1:AUDIO_FROM_CUSTOMER:1500", 1500, 2750, text, partial
    )


def test_a_final_segment_gets_one_row_keyed_by_contact_and_segment() -> None:
    (row,) = row_for(_segment("thank you"), FixedScorer(), "t", 7, 1_000_000)
    assert row.table == "t"
    assert (row.item["ContactId"], row.item["SegmentId"]) == ("c-1", "c-1:AUDIO_FROM_CUSTOMER:1500")
    assert row.item["Speaker"] == "customer" and row.item["Sentiment"] == "POSITIVE"
    assert str(row.item["StartTime"]) == "1.5" and row.item["ExpiresAfter"] == 1000 + 7 * 86_400


def test_partials_empty_text_and_other_events_get_no_row() -> None:
    scorer = FixedScorer()
    assert row_for(_segment("thank", partial=True), scorer, "t", 7, 0) == []
    assert row_for(_segment("   "), scorer, "t", 7, 0) == []
    assert row_for(CallEnded("c-1", EndReason.END_OF_STREAM, 0), scorer, "t", 7, 0) == []
    assert scorer.texts == []


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("thank you so much, that is wonderful", "POSITIVE"),
        ("this is terrible, I am very angry", "NEGATIVE"),
        ("I called about my bill", "NEUTRAL"),
    ],
)
def test_vader_labels_plain_english(text: str, label: str) -> None:
    sentiment = VaderScorer().score(text, "en-US")
    assert sentiment.label == label
    assert abs(sentiment.positive + sentiment.negative + sentiment.neutral - 1.0) < 0.01


def test_settings_refuse_an_unknown_engine() -> None:
    with pytest.raises(ConfigError, match="CALLSTREAM_SENTIMENT_ENGINE"):
        SentimentSettings.from_env({"CALLSTREAM_SENTIMENT_ENGINE": "magic"})


@pytest.mark.integration
def test_comprehend_scorer_reads_detect_sentiment(aws_session: Any) -> None:
    scorer = ComprehendScorer(aws_session.client("comprehend"))
    sentiment = scorer.score("x" * 6000 + " great", "es-US")
    assert sentiment.label in LABELS
    assert 0.0 <= sentiment.mixed <= 1.0
