"""The ingest service's AWS adapters: KVS media, the progress table, the audio stream read back."""

from __future__ import annotations

from callstream import aws
from callstream.config import BusSettings
from callstream.progress import DynamoProgress
from services.ingest.media import KvsMedia
from services.ingest.published import PublishedEvents
from services.ingest.settings import IngestSettings


def kvs_media(settings: IngestSettings) -> KvsMedia:
    """Kinesis Video Streams reads, a connection per running call and a few spare."""
    return KvsMedia(
        settings.bus.region,
        read_timeout_s=min(5.0, settings.idle_timeout_s),
        max_connections=settings.max_concurrent_calls + 8,
    )


def progress_store(bus: BusSettings, lease_ms: int) -> DynamoProgress:
    """The calls' ownership and resume points (CALLSTREAM_PROGRESS_TABLE)."""
    # Ownership writes are due within a lease: few quick retries of our own, not
    # the adaptive client's rate limiting (a failed one is retried next round).
    client = aws.client(
        "dynamodb",
        bus.region,
        retries={"mode": "standard", "max_attempts": 3},
        read_timeout=max(1.0, lease_ms / 3000),
    )
    return DynamoProgress(client, bus.progress_table, "ingest")


def published_events(bus: BusSettings) -> PublishedEvents:
    """What a previous owner of a call already published on the audio stream."""
    return PublishedEvents(aws.client("kinesis", bus.region), bus.audio_stream)
