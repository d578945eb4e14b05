"""The live view's AWS adapters: the streams it follows and the recordings it serves.

A failed poll is logged and retried, unless `callstream.awserrors` calls it a
configuration fault (a missing stream or bucket, access denied): that is raised.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import classify
from callstream.bus.tail import StreamTail
from callstream.errors import ConfigurationFault, PoisonRecordError
from callstream.events import Event
from callstream.service import ensure_stream
from services.liveview.settings import LiveViewSettings

log = logging.getLogger(__name__)


class CallStreams:
    """The calls, transcripts and recordings streams, tailed with `StreamTail` (no leases:
    every viewer sees everything). The recordings stream is created if missing."""

    def __init__(self, kinesis: Any, settings: LiveViewSettings) -> None:
        ensure_stream(kinesis, settings.recordings_stream)
        latest = settings.from_latest
        self.tails = [
            StreamTail(kinesis, settings.bus.calls_stream, latest=latest),
            StreamTail(kinesis, settings.bus.transcripts_stream, latest=latest),
            StreamTail(kinesis, settings.recordings_stream, latest=latest),
        ]

    def poll(self) -> list[Event | PoisonRecordError] | None:
        """What arrived on the streams; None after a failed poll (logged, to be retried).

        Raises ConfigurationFault when the poll can never succeed."""
        try:
            return [e for tail in self.tails for e in tail.poll()]
        except (ClientError, BotoCoreError) as e:
            error = classify(e, what="live view poll")
            if isinstance(error, ConfigurationFault):
                raise error from e
            log.warning("poll failed, retrying: %s", error)
            return None


class RecordingObjects:
    """The recordings in S3 (proxied, so the bucket stays private)."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    def get(self, bucket: str, key: str) -> bytes | None:
        """The recording's bytes, or None if S3 cannot give them (logged)."""
        try:
            return bytes(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except (ClientError, BotoCoreError) as e:
            log.warning("recording %s unavailable: %s", key, e)
            return None
