"""The transcriber's engines and stores: the configured speech engine, the progress table.

The engine is chosen by `CALLSTREAM_ASR_ENGINE`: `offline` (Moonshine on
onnxruntime, no network; decoding on a thread pool, so the consumer loop never
waits for it) or `transcribe` (Amazon Transcribe streaming in `TRANSCRIBE_REGION`,
options from `CALLSTREAM_TRANSCRIBE_*`, see `settings.py`).
"""

from __future__ import annotations

from typing import Protocol

from callstream import aws
from callstream.asr.port import SpeechEngine
from callstream.config import BusSettings
from callstream.progress import DynamoProgress
from services.transcriber.settings import TranscribeOptions, TranscriberSettings


class ClosableEngine(SpeechEngine, Protocol):
    """An engine that holds threads or connections until closed."""

    def close(self) -> None:
        """Release the engine's threads and connections."""


def make_engine(settings: TranscriberSettings, options: TranscribeOptions) -> ClosableEngine:
    """The configured speech engine (imported lazily: each has heavy dependencies)."""
    if settings.engine == "transcribe":
        from callstream.asr.transcribe.engine import TranscribeEngine

        engine = TranscribeEngine(
            settings.transcribe_region,
            default_language=settings.default_language,
            **options.engine_kwargs(),
        )
        if options.channel_mode == "stereo":
            from callstream.asr.transcribe.stereo import StereoTranscribeEngine

            return StereoTranscribeEngine(engine, **options.stereo_kwargs())
        return engine
    from callstream.asr.offline.engine import OfflineEngine
    from callstream.asr.offline.pool import PooledEngine

    return PooledEngine(OfflineEngine(), options.workers)


def progress_store(bus: BusSettings) -> DynamoProgress:
    """Each call's progress (CALLSTREAM_PROGRESS_TABLE): another instance resumes after it."""
    return DynamoProgress(aws.client("dynamodb", bus.region), bus.progress_table, "transcriber")
