"""One call's ingest session: read its KVS stream, publish its audio events.

The start fragment is fetched first through GetMediaForFragmentList, then
GetMedia continues after it; fragments seen twice (a server that treats
FRAGMENT_NUMBER as inclusive) are skipped by the core, so either reading of
the KVS documentation gives the same chunks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from callstream.bus.ports import EventSink
from callstream.errors import MediaStreamError
from callstream.events import CallEnded, CallStarted, EndReason, Event
from callstream.mkv.reader import MkvStreamReader
from services.ingest.core import CallIngest
from services.ingest.media import KvsMedia

log = logging.getLogger(__name__)


class CallSession:
    """Runs one call from CallStarted to CallEnded on the audio stream."""

    def __init__(
        self,
        call: CallStarted,
        media: KvsMedia,
        audio: EventSink,
        chunk_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.call = call
        self.media = media
        self.audio = audio
        self.core = CallIngest(call.contact_id, chunk_ms)
        self.clock = clock
        self.extra = {"contact_id": call.contact_id}

    def run(self) -> CallEnded:
        """Publish CallStarted, the call's chunks, then CallEnded; return the latter."""
        self.audio.publish([self.call])
        try:
            self._read_all()
            reason, detail = EndReason.END_OF_STREAM, "the media stream ended"
        except MediaStreamError as e:
            log.error("cannot read media: %s", e, extra=self.extra)
            reason, detail = EndReason.ERROR, str(e)
        events = self.core.finish(reason, detail, int(self.clock() * 1000))
        self.audio.publish(events)
        ended = self.core.ended
        assert ended is not None
        log.info("call ended: %s", ended.reason.value, extra=self.extra)
        return ended

    def _read_all(self) -> None:
        start = self.call.start_fragment_number
        if start is None:
            self._consume(self.media.get_media(self.call.stream_arn, {"StartSelectorType": "NOW"}))
            return
        try:
            self._consume(self.media.get_fragments(self.call.stream_arn, [start]))
        except MediaStreamError as e:
            log.warning(
                "start fragment not readable on its own (%s); GetMedia only", e, extra=self.extra
            )
        if not self.core.wants_end:
            selector = {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": start}
            self._consume(self.media.get_media(self.call.stream_arn, selector))

    def _consume(self, body: Iterable[bytes]) -> None:
        reader = MkvStreamReader()
        for data in body:
            self._publish_events(reader.feed(data))
            if self.core.wants_end:
                return
        self._publish_events(reader.close())

    def _publish_events(self, mkv_events: list[Any]) -> None:
        out: list[Event] = []
        for event in mkv_events:
            out.extend(self.core.accept(event))
            if self.core.wants_end:
                break
        if out:
            self.audio.publish(out)
