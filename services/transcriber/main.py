"""Transcriber service: the audio stream -> speech engine -> the transcripts stream.

Thin wiring over `core.CallTranscription`. The engine is chosen by
`CALLSTREAM_ASR_ENGINE`: `offline` (Moonshine on onnxruntime, no network) or
`transcribe` (Amazon Transcribe streaming in `TRANSCRIBE_REGION`, options from
`CALLSTREAM_TRANSCRIBE_*`, see `settings.py`). The offline engine's decoding
runs on a thread pool, so the consumer loop never waits for it. The handler
(`handler.py`) saves each call's progress in `CALLSTREAM_PROGRESS_TABLE`, so
another instance resumes a call after its last final.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

from callstream import aws
from callstream import log as logsetup
from callstream.asr.port import SpeechEngine
from callstream.config import TranscriberSettings
from callstream.errors import ConfigError
from callstream.progress import DynamoProgress
from callstream.service import load_settings, publisher, run_service
from services.transcriber.handler import TranscriberHandler
from services.transcriber.settings import TranscribeOptions

__all__ = ["TranscriberHandler", "main", "make_engine"]
log = logging.getLogger(__name__)


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


def check_engine_options(settings: TranscriberSettings, options: TranscribeOptions) -> None:
    """Refuse options the chosen engine would silently ignore."""
    if options.channel_mode == "stereo" and settings.engine != "transcribe":
        raise ConfigError(
            "CALLSTREAM_TRANSCRIBE_CHANNEL_MODE=stereo needs CALLSTREAM_ASR_ENGINE=transcribe, "
            f"got {settings.engine!r}"
        )


def main() -> None:
    """Entry point: `python -m services.transcriber.main`."""
    logsetup.configure("transcriber")
    settings = load_settings(TranscriberSettings.from_env)
    options = load_settings(TranscribeOptions.from_env)
    load_settings(lambda: check_engine_options(settings, options))
    engine = make_engine(settings, options)
    try:
        sink = publisher(settings.bus, settings.bus.transcripts_stream)
        policy = options.policy
        if settings.engine != "transcribe":
            # No idle limit offline, and silence inserted mid-utterance would split it
            # differently from a replay of the same audio.
            policy = dataclasses.replace(policy, keepalive_after_s=None)
        progress = DynamoProgress(
            aws.client("dynamodb", settings.bus.region), settings.bus.progress_table, "transcriber"
        )
        handler = TranscriberHandler(
            engine, sink, settings.default_language, policy, progress=progress
        )
        run_service("transcriber", settings.bus, settings.bus.audio_stream, handler)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
