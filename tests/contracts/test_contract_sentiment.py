"""Every sentiment scorer passes the one `Scorer` contract (services/sentiment/core.py).

Scorers: VADER (offline, its lexicon in its wheel) and Amazon Comprehend (the
unchanged boto3 client against the emulator's moto). What the sentiment
service relies on, whatever the scorer: a label among LABELS, each score in
0..1, the same answer for the same sentence (a replayed segment rewrites the
same row), any language code and any length taken without an error. A new
scorer is one more factory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.sentiment.core import LABELS, Scorer, Sentiment
from services.sentiment.engines import ComprehendScorer, VaderScorer

SENTENCES = (
    "thank you so much, that is wonderful",
    "this is terrible, I am very angry",
    "I called about my bill",
)


def _vader(request: pytest.FixtureRequest) -> Scorer:
    return VaderScorer()


def _comprehend(request: pytest.FixtureRequest) -> Scorer:
    session = request.getfixturevalue("aws_session")
    return ComprehendScorer(session.client("comprehend"))


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], Scorer]] = {
    "vader": _vader,
    "comprehend": _comprehend,
}


@pytest.fixture(
    params=[
        pytest.param("vader"),
        pytest.param("comprehend", marks=pytest.mark.integration),
    ]
)
def scorer(request: pytest.FixtureRequest) -> Scorer:
    return FACTORIES[request.param](request)


def _well_formed(sentiment: Any) -> None:
    assert isinstance(sentiment, Sentiment)
    assert sentiment.label in LABELS, sentiment
    for score in (sentiment.positive, sentiment.negative, sentiment.neutral, sentiment.mixed):
        assert 0.0 <= score <= 1.0, sentiment


def test_a_scorer_has_a_name(scorer: Scorer) -> None:
    assert isinstance(scorer.name, str) and scorer.name


def test_every_sentence_gets_a_label_and_scores_in_range(scorer: Scorer) -> None:
    for text in SENTENCES:
        _well_formed(scorer.score(text, "en-US"))


def test_the_same_sentence_gets_the_same_sentiment(scorer: Scorer) -> None:
    for text in SENTENCES:
        assert scorer.score(text, "en-US") == scorer.score(text, "en-US")


@pytest.mark.parametrize("language", ["en-US", "es-US", "fr-CA", "de-DE", "ja-JP", "xx-XX"])
def test_any_language_code_is_taken(scorer: Scorer, language: str) -> None:
    _well_formed(scorer.score("the parcel arrived today", language))


def test_a_long_multibyte_sentence_is_taken(scorer: Scorer) -> None:
    # Over Comprehend's 5,000-byte limit, with a multibyte character at the cut.
    _well_formed(scorer.score("é" * 2600 + " great service", "en-US"))
