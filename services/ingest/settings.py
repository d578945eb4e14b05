"""The ingest service's settings: KVS reading and chunking."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from callstream.config import BusSettings, Env


@dataclass(frozen=True)
class IngestSettings:
    """The ingest service: KVS reading and chunking."""

    bus: BusSettings
    chunk_ms: int
    start_selector_type: str
    idle_timeout_s: int
    max_concurrent_calls: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> IngestSettings:
        """Validate the ingest service's environment."""
        env = Env(environ)
        return cls(
            bus=BusSettings.from_env(env),
            chunk_ms=env.integer("CALLSTREAM_CHUNK_MS", 128, minimum=16, maximum=2000),
            start_selector_type=env.choice(
                "START_SELECTOR_TYPE", "FRAGMENT_NUMBER", ("FRAGMENT_NUMBER", "NOW")
            ),
            idle_timeout_s=env.integer("CALLSTREAM_IDLE_TIMEOUT_S", 30, minimum=1),
            max_concurrent_calls=env.integer("CALLSTREAM_MAX_CALLS", 200, minimum=1),
        )
