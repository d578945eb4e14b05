"""Transcriber service: the audio stream -> speech engine -> the transcripts stream.

Thin wiring over `core.CallTranscription`. The engine is chosen by
`CALLSTREAM_ASR_ENGINE`: `offline` (Moonshine on onnxruntime, no network) or
`transcribe` (Amazon Transcribe streaming in `TRANSCRIBE_REGION`). A call is
settled once its last segments and its CallEnded are published.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from callstream import log as logsetup
from callstream.asr.base import SpeechEngine
from callstream.bus.ports import EventSink, Record
from callstream.config import TranscriberSettings
from callstream.events import Event
from callstream.service import load_settings, publisher, run_service
from services.transcriber.core import CallTranscription

log = logging.getLogger(__name__)
_DONE_MEMORY = 10_000


class TranscriberHandler:
    """Routes each call's events to its transcription and publishes the results."""

    def __init__(self, engine: SpeechEngine, sink: EventSink, default_language: str) -> None:
        self.engine = engine
        self.sink = sink
        self.default_language = default_language
        self.calls: dict[str, CallTranscription] = {}
        self.done: OrderedDict[str, None] = OrderedDict()

    def handle(self, event: Event, record: Record) -> None:
        contact_id = getattr(event, "contact_id", None)
        if contact_id is None or contact_id in self.done:
            return
        call = self.calls.get(contact_id)
        if call is None:
            call = CallTranscription(contact_id, self.engine, self.default_language)
            self.calls[contact_id] = call
        self._publish(call, call.accept(event))

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.done

    def tick(self) -> None:
        for call in list(self.calls.values()):
            self._publish(call, call.poll())

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


def make_engine(settings: TranscriberSettings) -> SpeechEngine:
    """The configured speech engine (imported lazily: each has heavy dependencies)."""
    if settings.engine == "transcribe":
        from callstream.asr.transcribe import TranscribeEngine

        return TranscribeEngine(settings.transcribe_region)
    from callstream.asr.offline import OfflineEngine

    return OfflineEngine()


def main() -> None:
    """Entry point: `python -m services.transcriber.main`."""
    logsetup.configure("transcriber")
    settings = load_settings(TranscriberSettings.from_env)
    engine = make_engine(settings)
    sink = publisher(settings.bus, settings.bus.transcripts_stream)
    handler = TranscriberHandler(engine, sink, settings.default_language)
    run_service("transcriber", settings.bus, settings.bus.audio_stream, handler)


if __name__ == "__main__":
    main()
