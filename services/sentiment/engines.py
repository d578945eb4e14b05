"""Sentiment scorers: the VADER lexicon offline, or Amazon Comprehend.

VADER's lexicon ships inside the `vaderSentiment` wheel: nothing is fetched
at run time. Its compound score maps to a label with the thresholds its
authors recommend (>= 0.05 positive, <= -0.05 negative).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import classify
from callstream.errors import RetryableError
from services.sentiment.core import Sentiment

# DetectSentiment takes at most 5,000 bytes of UTF-8.
_COMPREHEND_MAX_BYTES = 5000
_COMPREHEND_LANGUAGES = {"en": "en", "es": "es", "fr": "fr", "de": "de", "it": "it", "pt": "pt"}


class VaderScorer:
    """Offline, rule-based: fast enough to score every final in-line."""

    name = "vader"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, text: str, language_code: str) -> Sentiment:
        """VADER's polarity scores; its lexicon is English whatever the language."""
        scores = self._analyzer.polarity_scores(text)
        compound = scores["compound"]
        if compound >= 0.05:
            label = "POSITIVE"
        elif compound <= -0.05:
            label = "NEGATIVE"
        else:
            label = "NEUTRAL"
        return Sentiment(label, scores["pos"], scores["neg"], scores["neu"])


class ComprehendScorer:
    """Amazon Comprehend DetectSentiment, one call per final segment."""

    name = "comprehend"

    def __init__(self, client: Any) -> None:
        self.client = client

    def score(self, text: str, language_code: str) -> Sentiment:
        """Comprehend's label and scores; throttling is retried by the service loop."""
        language = _COMPREHEND_LANGUAGES.get(language_code.split("-")[0].lower(), "en")
        clipped = text.encode()[:_COMPREHEND_MAX_BYTES].decode(errors="ignore")
        try:
            answer = self.client.detect_sentiment(Text=clipped, LanguageCode=language)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("ThrottlingException", "InternalServerException"):
                raise RetryableError(f"Comprehend {code}") from e
            raise classify(e, what=f"scoring with {self.name}") from e
        except BotoCoreError as e:
            raise RetryableError(f"Comprehend unreachable: {e}") from e
        scores = answer["SentimentScore"]
        return Sentiment(
            answer["Sentiment"],
            scores["Positive"],
            scores["Negative"],
            scores["Neutral"],
            scores["Mixed"],
        )
