"""Transcriber service: the audio stream -> speech engine -> the transcripts stream.

Wiring only: settings -> the speech engine and the progress table (`adapters`)
-> `handler.TranscriberHandler` (over `core.CallTranscription`) -> `run_service`.
"""

from __future__ import annotations

from callstream import log as logsetup
from callstream.service import load_settings, publisher, run_service
from services.transcriber.adapters import make_engine, progress_store
from services.transcriber.handler import TranscriberHandler
from services.transcriber.settings import (
    TranscribeOptions,
    TranscriberSettings,
    check_engine_options,
    recovery_policy,
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
        policy = recovery_policy(settings, options)
        progress = progress_store(settings.bus)
        handler = TranscriberHandler(
            engine, sink, settings.default_language, policy, progress=progress
        )
        run_service("transcriber", settings.bus, settings.bus.audio_stream, handler)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
