"""Ingest service: CallStarted on the calls stream -> KVS -> the audio stream.

Wiring only: settings -> KVS media, the progress table, the audio stream
(`adapters`) -> `handler.IngestHandler` (a bounded pool of call sessions) -> `run_service`.
"""

from __future__ import annotations

from callstream import log as logsetup
from callstream.service import lease_ms, load_settings, publisher, run_service
from services.ingest.adapters import kvs_media, progress_store, published_events
from services.ingest.handler import IngestHandler
from services.ingest.settings import IngestSettings


def main() -> None:
    """Entry point: `python -m services.ingest.main`."""
    logsetup.configure("ingest")
    settings = load_settings(IngestSettings.from_env)
    bus = settings.bus
    lease = lease_ms()
    handler = IngestHandler(
        settings,
        progress=progress_store(bus, lease),
        lease=lease,
        media=kvs_media(settings),
        audio=publisher(bus, bus.audio_stream),
        published=published_events(bus),
    )
    try:
        run_service("ingest", settings.bus, settings.bus.calls_stream, handler)
    finally:
        handler.close()  # running calls save where they are and release: taken over at once


if __name__ == "__main__":
    main()
