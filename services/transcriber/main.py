"""Transcriber service: the audio stream -> speech engine -> the transcripts stream.

Thin wiring over `core.CallTranscription`. The engine is chosen by
`CALLSTREAM_ASR_ENGINE`: `offline` (Moonshine on onnxruntime, no network) or
`transcribe` (Amazon Transcribe streaming in `TRANSCRIBE_REGION`, options from
`CALLSTREAM_TRANSCRIBE_*`, see `settings.py`). The offline engine's decoding
runs on a thread pool, so the consumer loop never waits for it. The handler
passes the monotonic clock to the core, which decides retries and keep-alives.
A call is settled once its last segments and its CallEnded are published.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from callstream import log as logsetup
from callstream.asr.base import SpeechEngine
from callstream.bus.ports import EventSink, Record
from callstream.config import TranscriberSettings
from callstream.events import Event
from callstream.service import load_settings, publisher, run_service
from services.transcriber.core import CallTranscription
from services.transcriber.recovery import RecoveryPolicy
from services.transcriber.settings import TranscribeOptions

log = logging.getLogger(__name__)
_DONE_MEMORY = 10_000


class TranscriberHandler:
    """Routes each call's events to its transcription and publishes the results."""

    def __init__(
        self,
        engine: SpeechEngine,
        sink: EventSink,
        default_language: str,
        policy: RecoveryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.sink = sink
        self.default_language = default_language
        self.policy = policy or RecoveryPolicy()
        self.clock = clock
        self.calls: dict[str, CallTranscription] = {}
        self.done: OrderedDict[str, None] = OrderedDict()

    def handle(self, event: Event, record: Record) -> None:
        contact_id = getattr(event, "contact_id", None)
        if contact_id is None or contact_id in self.done:
            return
        call = self.calls.get(contact_id)
        if call is None:
            call = CallTranscription(contact_id, self.engine, self.default_language, self.policy)
            self.calls[contact_id] = call
        self._publish(call, call.accept(event, self.clock()))

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.done

    def tick(self) -> None:
        for call in list(self.calls.values()):
            self._publish(call, call.poll(self.clock()))

    def forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            self.calls.pop(contact_id, None)

    def _publish(self, call: CallTranscription, events: list[Event]) -> None:
        if events:
            self.sink.publish(events)
        if call.done:
            self.calls.pop(call.contact_id, None)
            self.done[call.contact_id] = None
            while len(self.done) > _DONE_MEMORY:
                self.done.popitem(last=False)


class ClosableEngine(SpeechEngine, Protocol):
    """An engine that holds threads or connections until closed."""

    def close(self) -> None:
        """Release the engine's threads and connections."""


def make_engine(settings: TranscriberSettings, options: TranscribeOptions) -> ClosableEngine:
    """The configured speech engine (imported lazily: each has heavy dependencies)."""
    if settings.engine == "transcribe":
        from callstream.asr.transcribe import TranscribeEngine

        return TranscribeEngine(
            settings.transcribe_region,
            default_language=settings.default_language,
            **options.engine_kwargs(),
        )
    from callstream.asr.offline import OfflineEngine
    from callstream.asr.pool import PooledEngine

    return PooledEngine(OfflineEngine(), options.workers)


def main() -> None:
    """Entry point: `python -m services.transcriber.main`."""
    logsetup.configure("transcriber")
    settings = load_settings(TranscriberSettings.from_env)
    options = load_settings(TranscribeOptions.from_env)
    engine = make_engine(settings, options)
    try:
        sink = publisher(settings.bus, settings.bus.transcripts_stream)
        policy = options.policy
        if settings.engine != "transcribe":
            # No idle limit offline, and silence inserted mid-utterance would split it
            # differently from a replay of the same audio.
            policy = dataclasses.replace(policy, keepalive_after_s=None)
        handler = TranscriberHandler(engine, sink, settings.default_language, policy)
        run_service("transcriber", settings.bus, settings.bus.audio_stream, handler)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
