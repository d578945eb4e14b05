"""The sentiment service's settings: where rows go and which engine scores them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from callstream.config import BusSettings, Env


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
