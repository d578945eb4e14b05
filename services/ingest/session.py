"""One call's ingest session: read its KVS stream (or input file), publish its audio events.

The start fragment is fetched first through GetMediaForFragmentList, then
GetMedia continues after it; fragments seen twice (a server that treats
FRAGMENT_NUMBER as inclusive) are skipped by the core, so either reading of
the KVS documentation gives the same chunks.

A GetMedia connection that drops, stalls or ends on purpose (its data
endpoint is due for a refresh) is re-opened with StartSelector
CONTINUATION_TOKEN; the same `CallIngest` keeps going, and skips what it
already took of a fragment sent again. The call ends when the core says so
(ContactId changed, no audio track), when the server ends the stream, when no
new fragment came for `idle_timeout_s`, or after `max_failures` reconnects in
a row without progress.

File mode (`stream_arn` is an `s3://` URI): the object is read in pieces and
published as fast as it decodes, through the same core and events.

Takeover (with a `CallOwnership`): after the chunks of each completed
fragment are published, the core's export is saved as the call's progress
(one conditional DynamoDB write per fragment); CallStarted is followed by a
save, CallEnded by a last one, then the call is released. A session made
with `resume` (a saved or advanced export) does not publish CallStarted
again and reads on after the last completed fragment (CONTINUATION_TOKEN
with the saved token, else FRAGMENT_NUMBER); a fragment it had published
part of is read again and the published bytes skipped. The `stop` event
(the calls shard was lost) is checked in the read loop after each publish:
the session saves where it is, releases the call and raises `SessionStopped`.
A save refused because another instance owns the call raises
`OwnershipLost` at once, with nothing more published. File mode resumes
only `started`/`ended`: a file call taken over is read again from its start.

A publish the audio stream does not take (`RetryableError` from the sink:
its own retries are spent) ends the run with `PublishFailed`, never taken
for a failed media read: the core has already cut those chunks, and reading
on would skip them. Nothing is saved past what is published; the handler
runs the call again (`Takeover`: the progress saved, advanced past what the
stream holds). Likewise the last save, after CallEnded, must be stored
before the call is released and counted as ended: if it is not, the run
raises and the call is run again, which finds the CallEnded on the stream.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any, Protocol

from callstream.bus.ports import EventSink
from callstream.errors import MediaStreamError, RetryableError
from callstream.events import CallEnded, CallStarted, EndReason, Event, Track
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import ClusterEnded, StreamError
from services.ingest.core import CallIngest
from services.ingest.media import EndpointExpired, ReadStalled, iter_s3_object
from services.ingest.ownership import CallOwnership
from services.ingest.pcmfile import PcmFileReader

log = logging.getLogger(__name__)


class SessionStopped(Exception):
    """The session was told to stop (its calls shard was lost); progress saved, call released."""


class PublishFailed(RetryableError):
    """The audio stream did not take a publish: this run ends; the call is run again."""


_FILE_TRACKS = (Track.FROM_CUSTOMER, Track.TO_CUSTOMER)


class MediaSource(Protocol):
    """What a session needs of the KVS edge (`media.KvsMedia`; scripted in tests)."""

    region: str

    def get_media(
        self, stream_arn: str, selector: dict[str, Any]
    ) -> Generator[bytes, None, None]: ...

    def get_fragments(
        self, stream_arn: str, fragment_numbers: list[str]
    ) -> Generator[bytes, None, None]: ...

    def endpoint_stale(self, stream_arn: str, api: str = "GET_MEDIA") -> bool: ...

    def release(self, stream_arn: str) -> None: ...


class CallSession:
    """Runs one call from CallStarted to CallEnded on the audio stream."""

    def __init__(
        self,
        call: CallStarted,
        media: MediaSource,
        audio: EventSink,
        chunk_ms: int,
        clock: Callable[[], float] = time.time,
        *,
        idle_timeout_s: float = 30.0,
        start_selector_type: str = "FRAGMENT_NUMBER",
        max_failures: int = 8,
        retry_delay_s: float = 0.2,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        ownership: CallOwnership | None = None,
        resume: dict[str, Any] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.call = call
        self.media = media
        self.audio = audio
        self.file_mode = call.stream_arn.startswith("s3://")
        self.ownership = ownership
        self.stop = stop or threading.Event()
        self.started = bool(resume and resume.get("started"))
        self.resumed = resume is not None and not self.file_mode
        if resume is not None and self.resumed:
            self.core = CallIngest.restore(resume, chunk_ms)
        else:
            self.core = CallIngest(call.contact_id, chunk_ms)
        self.prior_reconnects = int(resume.get("reconnects", 0)) if self.resumed and resume else 0
        self.clock = clock
        self.idle_timeout_s = idle_timeout_s
        # START_SELECTOR_TYPE=NOW (as the reference): ignore the start fragment, read from now.
        self.start_fragment = (
            call.start_fragment_number if start_selector_type == "FRAGMENT_NUMBER" else None
        )
        self.max_failures = max_failures
        self.retry_delay_s = retry_delay_s
        self.monotonic = monotonic
        self.sleep = sleep
        self.extra = {"contact_id": call.contact_id}
        self.connections = 0
        self._seen = 0
        self._last_fragment_at = monotonic()

    @property
    def reconnects(self) -> int:
        """GetMedia connections opened after the first (a resumed call's are all re-opened)."""
        opened = self.connections if self.resumed else max(0, self.connections - 1)
        return self.prior_reconnects + opened

    def run(self) -> CallEnded:
        """Publish CallStarted (unless resumed), the chunks, then CallEnded; return the latter.

        Raises SessionStopped when `stop` is set, OwnershipLost when the call was taken.
        """
        if not self.started:
            self._publish([self.call])
            self.started = True
            self._save()
        try:
            if self.file_mode:
                reason, detail = self._read_file()
            else:
                reason, detail = self._read_stream()
        except MediaStreamError as e:
            log.error("cannot read media: %s", e, extra=self.extra)
            reason, detail = EndReason.ERROR, str(e)
        except SessionStopped:
            self._save()
            if self.ownership is not None:
                self.ownership.release()
            log.info("stopped; progress saved, call released", extra=self.extra)
            raise
        finally:
            self.media.release(self.call.stream_arn)
        now_ms = int(self.clock() * 1000)
        last = self.core.finish(reason, detail, now_ms, self.reconnects)
        # CallEnded goes out alone, once every chunk before it is stored: in one
        # batch, a kill could store the CallEnded but not a chunk before it, and a
        # call read back as ended would never publish that chunk.
        self._publish(last[:-1])
        self._publish(last[-1:])
        self._save(required=True)
        if self.ownership is not None:
            self.ownership.release()
        ended = self.core.ended
        assert ended is not None
        log.info("call ended: %s (%s)", ended.reason.value, ended.detail, extra=self.extra)
        return ended

    # --- progress -------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """What is published of the call, as saved (the core's export and the session's counts)."""
        state = self.core.export()
        state["started"] = self.started
        state["reconnects"] = self.reconnects
        return state

    def _save(self, *, required: bool = False) -> None:
        if self.ownership is not None:
            self.ownership.save(self.progress(), required=required)

    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        if self.ownership is not None:
            self.ownership.confirm()  # never publish once the call may be another's
        try:
            self.audio.publish(events)
        except RetryableError as e:
            raise PublishFailed(
                f"{len(events)} events of call {self.call.contact_id} not published: {e}"
            ) from e

    def _check_stop(self) -> None:
        """Between publishes only: everything the core emitted is then on the stream."""
        if self.stop.is_set():
            raise SessionStopped(f"call {self.call.contact_id} stopped")

    # --- KVS --------------------------------------------------------------------
    def _read_stream(self) -> tuple[EndReason, str]:
        start = self.start_fragment
        if start is not None and self.core.last_completed_fragment is None:
            try:
                self._consume(self.media.get_fragments(self.call.stream_arn, [start]))
            except PublishFailed:
                raise
            except (MediaStreamError, RetryableError) as e:
                log.warning(
                    "start fragment not readable on its own (%s); GetMedia only",
                    e,
                    extra=self.extra,
                )
        self._last_fragment_at = self.monotonic()
        failures = 0
        while not self.core.wants_end:
            self._check_stop()
            seen = self.core.fragments_seen
            try:
                if self._consume(self.media.get_media(self.call.stream_arn, self._selector())):
                    return EndReason.END_OF_STREAM, "the media stream ended"
            except ReadStalled:
                pass  # silence: the idle check below decides
            except EndpointExpired as e:
                log.info("data endpoint expired (%s); fetching a new one", e, extra=self.extra)
            except PublishFailed:
                raise
            except RetryableError as e:
                failures = 0 if self.core.fragments_seen > seen else failures + 1
                if failures > self.max_failures:
                    raise MediaStreamError(f"gave up after {failures} failed reads: {e}") from e
                log.warning("media read failed (%s); resuming", e, extra=self.extra)
                self.sleep(self.retry_delay_s * (2 ** min(failures, 5)) * random.random())
            if self._idle():
                return EndReason.IDLE_TIMEOUT, f"no new fragment for {self.idle_timeout_s:g} s"
        return EndReason.END_OF_STREAM, "the media stream ended"

    def _selector(self) -> dict[str, Any]:
        token, start = self.core.continuation_token, self.start_fragment
        self.connections += 1
        if (self.connections > 1 or self.resumed) and token is not None:
            return {"StartSelectorType": "CONTINUATION_TOKEN", "ContinuationToken": token}
        after = self.core.last_completed_fragment or start
        if after is None:
            return {"StartSelectorType": "NOW"}
        return {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": after}

    def _idle(self) -> bool:
        return self.monotonic() - self._last_fragment_at >= self.idle_timeout_s

    def _consume(self, body: Generator[bytes, None, None]) -> bool:
        """Read one connection; True if the server ended it, False if we left it early.

        A body that ends inside an element, or with GetMedia's error tag, ended
        early: RetryableError, so the caller resumes from the continuation token.
        """
        reader = MkvStreamReader()
        token = self.core.continuation_token
        self.core.server_error = None
        try:
            for data in body:
                self._publish_events(reader.feed(data))
                self._check_stop()
                if self.core.wants_end:
                    return True
                if self._leave_early(token):
                    return False
            last = reader.close()
            self._publish_events(last)
        finally:
            body.close()  # releases the connection at once when we leave early
        cut = next((e.reason for e in last if isinstance(e, StreamError)), None)
        if self.core.server_error is not None or cut is not None:
            cause = f"error code {self.core.server_error}" if self.core.server_error else cut
            raise RetryableError(f"media connection ended early ({cause})")
        return True

    def _leave_early(self, token: str | None) -> bool:
        """At a fragment boundary, with the endpoint due for a refresh, or when idle."""
        if self.core.fragments_seen != self._seen:
            self._seen = self.core.fragments_seen
            self._last_fragment_at = self.monotonic()
        elif self._idle():
            return True
        at_boundary = self.core.continuation_token != token
        return at_boundary and self.media.endpoint_stale(self.call.stream_arn)

    def _publish_events(self, mkv_events: list[Any]) -> None:
        out: list[Event] = []
        for event in mkv_events:
            done = self.core.last_completed_fragment
            out.extend(self.core.accept(event))
            if isinstance(event, ClusterEnded) and self.core.last_completed_fragment != done:
                # A fragment is complete: publish its chunks, then save (the core is simple here).
                self._publish_chunks(out)
                out = []
                self._save()
            if self.core.wants_end:
                break
        self._publish_chunks(out)

    def _publish_chunks(self, out: list[Event]) -> None:
        if out:
            self._publish(out)
            # Audio arrived, and a publish held up by throttling is not silence.
            self._last_fragment_at = self.monotonic()

    # --- file mode ----------------------------------------------------------------
    def _read_file(self) -> tuple[EndReason, str]:
        reader = PcmFileReader()
        samples = 0  # per channel, so times do not drift with odd piece sizes
        pieces: Iterable[bytes] = iter_s3_object(self.media.region, self.call.stream_arn)
        for data in pieces:
            samples = self._publish_pcm(reader.feed(data), samples)
            self._check_stop()
        self._publish_pcm(reader.close(), samples)
        if reader.channels is None:
            return EndReason.NO_AUDIO_TRACK, "the input file is empty"
        return EndReason.END_OF_STREAM, "the input file ended"

    def _publish_pcm(self, channels: list[bytes], samples: int) -> int:
        """Publish one run per channel starting `samples` into the file; return the new count."""
        time_ms = self.call.requested_at_ms + samples // 8
        out: list[Event] = []
        for track, pcm in zip(_FILE_TRACKS, channels, strict=False):
            if pcm:
                out.extend(self.core.accept_pcm(track, pcm, time_ms))
        self._publish(out)
        return samples + (len(channels[0]) // 2 if channels else 0)
