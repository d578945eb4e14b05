"""The live view's settings: where to listen and which streams to follow."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from callstream.config import BusSettings, Env, recordings_stream


@dataclass(frozen=True)
class LiveViewSettings:
    """Where to listen and which streams to follow."""

    bus: BusSettings
    port: int
    recordings_stream: str
    from_latest: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveViewSettings:
        """CALLSTREAM_LIVEVIEW_PORT/_FROM, CALLSTREAM_RECORDINGS_STREAM (RecordingStored
        names each recording's bucket and key)."""
        env = Env(environ)
        return cls(
            bus=BusSettings.from_env(env),
            port=env.integer("CALLSTREAM_LIVEVIEW_PORT", 8080, minimum=0, maximum=65535),
            recordings_stream=recordings_stream(env),
            from_latest=env.choice("CALLSTREAM_LIVEVIEW_FROM", "start", ("start", "latest"))
            == "latest",
        )
