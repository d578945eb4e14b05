"""Ingest service: CallStarted on the calls stream -> KVS -> the audio stream.

Thin wiring: settings, clients, a bounded pool of call sessions, the loop.
A call is settled (its CallStarted may be checkpointed past) once its
CallEnded is published.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from callstream import log as logsetup
from callstream.bus.ports import Record
from callstream.config import IngestSettings
from callstream.errors import PoisonRecordError
from callstream.events import CallStarted, Event
from callstream.service import load_settings, publisher, run_service
from services.ingest.media import KvsMedia
from services.ingest.session import CallSession

log = logging.getLogger(__name__)


class IngestHandler:
    """Starts a session per CallStarted; tracks which calls are done."""

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.media = KvsMedia(
            settings.bus.region,
            read_timeout_s=min(5.0, settings.idle_timeout_s),
            max_connections=settings.max_concurrent_calls + 8,
        )
        self.audio = publisher(settings.bus, settings.bus.audio_stream)
        self.pool = ThreadPoolExecutor(settings.max_concurrent_calls, thread_name_prefix="call")
        self.sessions: dict[str, Future[object]] = {}

    def handle(self, event: Event, record: Record) -> None:
        if not isinstance(event, CallStarted):
            raise PoisonRecordError(
                f"calls stream carries CallStarted only, got {type(event).__name__}"
            )
        if event.contact_id in self.sessions:
            return  # a replay of a call already running here
        session = CallSession(
            event,
            self.media,
            self.audio,
            self.settings.chunk_ms,
            idle_timeout_s=self.settings.idle_timeout_s,
            start_selector_type=self.settings.start_selector_type,
        )
        self.sessions[event.contact_id] = self.pool.submit(session.run)

    def is_settled(self, contact_id: str) -> bool:
        future = self.sessions.get(contact_id)
        return future is not None and future.done() and future.exception() is None

    def tick(self) -> None:
        for contact_id, future in list(self.sessions.items()):
            if future.done() and future.exception() is not None:
                log.error(
                    "call session failed: %s", future.exception(), extra={"contact_id": contact_id}
                )
                del self.sessions[contact_id]  # unsettled: the replay after restart retries it

    def forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            self.sessions.pop(contact_id, None)


def main() -> None:
    """Entry point: `python -m services.ingest.main`."""
    logsetup.configure("ingest")
    settings = load_settings(IngestSettings.from_env)
    run_service("ingest", settings.bus, settings.bus.calls_stream, IngestHandler(settings))


if __name__ == "__main__":
    main()
