"""Recorder service: the audio stream -> recordings in S3, announced on the recordings stream.

Wiring only: settings -> S3 client, progress table, recordings stream ->
`handler.RecorderHandler` -> `callstream.service.run_service`. What is
recorded and how is in `core.py` (docs/recordings.md); the S3 calls are in
`adapters.py`.

Several instances may run at once: each spools under its own worker id, so
two instances that both see a call (a takeover, a stolen lease) never write
into or delete each other's files; a call taken over continues its upload
from the progress table.
"""

from __future__ import annotations

from callstream import aws
from callstream import log as logsetup
from callstream.bus.kinesis import KinesisPublisher
from callstream.metrics import start_observability
from callstream.progress import DynamoProgress
from callstream.service import ensure_stream, load_settings, run_service
from services.recorder.handler import RecorderHandler
from services.recorder.settings import RecorderSettings

__all__ = ["RecorderHandler", "main"]


def main() -> None:
    """Entry point: `python -m services.recorder.main`."""
    logsetup.configure("recorder")
    settings = load_settings(RecorderSettings.from_env)
    bus = settings.bus
    kinesis = aws.client("kinesis", bus.region)
    ensure_stream(kinesis, settings.recordings_stream)
    metrics = start_observability("recorder")  # the loop's counters and the recorder's
    handler = RecorderHandler(
        settings,
        aws.client("s3", bus.region),
        sink=KinesisPublisher(
            kinesis, settings.recordings_stream, deadline_s=bus.publish_deadline_s
        ),
        progress=DynamoProgress(aws.client("dynamodb", bus.region), bus.progress_table, "recorder"),
        metrics=metrics,
        upload_workers=settings.upload_workers,
    )
    run_service("recorder", bus, bus.audio_stream, handler, metrics=metrics)


if __name__ == "__main__":
    main()
