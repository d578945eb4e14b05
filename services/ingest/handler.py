"""The ingest handler: a session per CallStarted on a bounded thread pool, under its ownership.

A call is settled (its CallStarted may be checkpointed past) once its
CallEnded is published; `tick` then moves it from the running calls to a
bounded memory of ended ones (a replayed CallStarted of an ended call is
skipped), so memory and `tick`'s walk follow the calls in progress, not every
call the process has served. Each call runs under its ownership in the progress
table (`CALLSTREAM_PROGRESS_TABLE`, see `takeover.py`): a call held by a live
other instance is retried from `tick` and stays unsettled meanwhile; a call
whose shard is lost (`forget`) is stopped, saved and released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from callstream.bus.ports import EventSink, Record
from callstream.errors import ConfigurationFault, PoisonRecordError
from callstream.events import CallStarted, Event
from callstream.progress import OwnedProgressStore
from services.ingest.adapters import published_events
from services.ingest.ownership import CallOwnership, Heartbeats
from services.ingest.published import PublishedEvents
from services.ingest.session import CallSession, MediaSource
from services.ingest.settings import IngestSettings
from services.ingest.takeover import Outcome, Takeover

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0
ENDED_MEMORY = 10_000  # ended calls remembered, to skip their replayed CallStarted


@dataclass
class _Call:
    """One CallStarted this instance is responsible for."""

    event: CallStarted
    stop: threading.Event = field(default_factory=threading.Event)
    future: Future[Outcome] | None = None
    retry_at: float = 0.0
    attempts: int = 0


class IngestHandler:
    """Runs a session per CallStarted under its ownership; tracks which calls are done."""

    def __init__(
        self,
        settings: IngestSettings,
        *,
        progress: OwnedProgressStore,
        lease: int,
        media: MediaSource,
        audio: EventSink,
        published: PublishedEvents | None = None,
        ended_memory: int = ENDED_MEMORY,
    ) -> None:
        self.settings = settings
        self.media = media
        self.audio = audio
        self.lease_ms = lease
        self.takeover = Takeover(
            progress,
            settings.bus.worker_id,
            self.lease_ms,
            published or published_events(settings.bus),
            Heartbeats(self.lease_ms),
        )
        self.pool = ThreadPoolExecutor(settings.max_concurrent_calls, thread_name_prefix="call")
        self.calls: dict[str, _Call] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()  # bounded, oldest first
        self.ended_memory = ended_memory
        self._running: set[str] = set()  # contacts with a run in a pool thread
        self._lock = threading.Lock()

    def handle(self, event: Event, record: Record) -> None:
        if not isinstance(event, CallStarted):
            raise PoisonRecordError(
                f"calls stream carries CallStarted only, got {type(event).__name__}"
            )
        if event.contact_id in self.calls or event.contact_id in self.ended:
            return  # a replay of a call running or ended here
        call = _Call(event)
        self.calls[event.contact_id] = call
        self._submit(call)

    def is_settled(self, contact_id: str) -> bool:
        if contact_id in self.ended:
            return True
        call = self.calls.get(contact_id)
        future = call.future if call is not None else None
        return (
            future is not None
            and future.done()
            and future.exception() is None
            and future.result() is Outcome.ENDED
        )

    def tick(self) -> None:
        now = time.monotonic()
        for contact_id, call in list(self.calls.items()):
            future = call.future
            if future is None or not future.done():
                if future is None and now >= call.retry_at:
                    self._submit(call)
                continue
            error = future.exception()
            if isinstance(error, ConfigurationFault):
                raise error  # no call can succeed: the loop stops the service (exit 3)
            if error is not None:
                log.error("call session failed: %s", error, extra={"contact_id": contact_id})
            elif future.result() is Outcome.ENDED:
                self._retire(contact_id)
                continue
            elif future.result() is Outcome.STOPPED:
                continue
            # Held elsewhere, taken from us, or failed: claim again later (unsettled meanwhile).
            call.future = None
            call.attempts += 1
            call.retry_at = now + min(RETRY_MAX_S, self.lease_ms / 3000 * call.attempts)

    def forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            call = self.calls.pop(contact_id, None)
            if call is not None:
                call.stop.set()  # the session saves, releases the call and stops

    def _retire(self, contact_id: str) -> None:
        """An ended call leaves the running calls for the bounded memory of ended ones."""
        self.calls.pop(contact_id, None)
        self.ended[contact_id] = None
        while len(self.ended) > self.ended_memory:
            self.ended.popitem(last=False)

    def close(self) -> None:
        """Stop every running call (saved and released) and wait for them."""
        for call in self.calls.values():
            call.stop.set()
        self.pool.shutdown(wait=True)
        self.takeover.heartbeats.close()

    def _submit(self, call: _Call) -> None:
        call.future = self.pool.submit(self._run, call)

    def _run(self, call: _Call) -> Outcome:
        contact_id = call.event.contact_id
        with self._lock:
            if contact_id in self._running:  # a stopping run of the same call is still saving
                return Outcome.WAITING
            self._running.add(contact_id)
        try:
            if call.stop.is_set():
                return Outcome.STOPPED
            return self.takeover.run(call.event, lambda state, own: self._session(call, state, own))
        finally:
            with self._lock:
                self._running.discard(contact_id)

    def _session(
        self, call: _Call, state: dict[str, Any] | None, ownership: CallOwnership
    ) -> CallSession:
        return CallSession(
            call.event,
            self.media,
            self.audio,
            self.settings.chunk_ms,
            idle_timeout_s=self.settings.idle_timeout_s,
            start_selector_type=self.settings.start_selector_type,
            ownership=ownership,
            resume=state,
            stop=call.stop,
        )
