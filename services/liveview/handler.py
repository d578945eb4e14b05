"""The live view's state: the board the stream followers update and the HTTP threads read.

Follows the calls stream (CallStarted), the transcripts stream (segments,
CallEnded) and the recordings stream (RecordingStored: a recording is shown
once the recorder says it is complete, S3 is never polled).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from callstream.errors import ConfigurationFault, PoisonRecordError
from services.liveview.adapters import CallStreams, RecordingObjects
from services.liveview.core import CallBoard

log = logging.getLogger(__name__)


class LiveView:
    """The board, the stream followers and the S3 look-ups, shared by the HTTP threads."""

    def __init__(self, streams: CallStreams, recordings: RecordingObjects) -> None:
        self.streams = streams
        self.recordings = recordings
        self.board = CallBoard()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.fault: ConfigurationFault | None = None  # what stopped `follow`, if anything

    def follow(self, stop: threading.Event) -> None:
        """Poll the streams until `stop`; a failed poll is logged and retried,
        a configuration fault is kept in `fault` and sets `stop`."""
        while not stop.is_set():
            try:
                busy = self._poll_streams()
            except ConfigurationFault as error:
                log.critical("configuration fault, stopping: %s", error)
                self.fault = error
                stop.set()
                return
            if not busy:
                stop.wait(0.3)

    def wait_for_change(self, after: int, timeout_s: float) -> dict[str, Any]:
        """The board once its version differs from `after` (or after the timeout)."""
        with self.changed:
            self.changed.wait_for(lambda: self.board.version != after, timeout=timeout_s)
            return self.board.snapshot()

    def recording(self, key: str) -> bytes | None:
        """The bytes of a recording on the board, or None."""
        with self.lock:
            bucket = self.board.bucket_of(key)
        if bucket is None:
            return None
        return self.recordings.get(bucket, key)

    def _poll_streams(self) -> bool:
        events = self.streams.poll()
        if events is None:
            return False
        with self.changed:
            for event in events:
                if not isinstance(event, PoisonRecordError):
                    self.board.apply(event)
            if events:
                self.changed.notify_all()
        return bool(events)
