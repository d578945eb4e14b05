"""One stream's session: audio from the request to the engine, results and faults back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from callstream.asr.port import Hypothesis
from callstream.audio import SAMPLE_RATE
from callstream_emulator.transcribe.asgi import Send
from callstream_emulator.transcribe.body import RequestBody, Signal
from callstream_emulator.transcribe.channels import Channels
from callstream_emulator.transcribe.codec import exception_event, transcript_event
from callstream_emulator.transcribe.errors import ServiceError, service_error_for
from callstream_emulator.transcribe.faults import Fault

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """A session's clock: how often it polls, how long it drains, when it idles out."""

    poll_interval_s: float
    drain_timeout_s: float
    idle_timeout_s: float


class StreamSession:
    """Feeds one request's audio to its engine stream(s) and sends back what they recognise."""

    def __init__(
        self,
        stream: Channels,
        body: RequestBody,
        send: Send,
        fault: Fault | None,
        drop: Callable[[], None],
        timing: Timing,
    ) -> None:
        self._stream = stream
        self._body = body
        self._send = send
        self._fault = fault
        self._drop = drop
        self._timing = timing
        self._getter: asyncio.Future[bytes | Signal] | None = None

    async def run(self) -> None:
        try:
            flushed = await self._transcribe()
        except ServiceError as error:
            _log.info("stream failed with %s", error)
            await self._send_body(exception_event(error.name, error.message), more=True)
            await self._body.drain(self._timing.drain_timeout_s)
            await self._send_body(b"", more=False)
            await asyncio.to_thread(self._stream.close_quietly)
            return
        finally:
            if self._getter is not None:
                self._getter.cancel()
        if flushed:
            # The client's END_STREAM may follow its end-of-audio event: closing our side
            # first would let that frame reach a stream hypercorn already dropped, which
            # tears down the whole connection before the last results are read.
            await self._body.drain(self._timing.drain_timeout_s)
            await self._send_body(b"", more=False)
        else:
            await asyncio.to_thread(self._stream.close_quietly)

    async def _transcribe(self) -> bool:
        """Run until the client's audio is flushed (True) or the stream is abandoned (False)."""
        loop = asyncio.get_running_loop()
        audio_events, audio_bytes, last_audio = 0, 0, loop.time()
        record = self._body.record
        bytes_per_ms = 2 * (record.channels if record else 1) * SAMPLE_RATE // 1000
        while True:
            item = await self._next_item()
            if item is Signal.END_OF_AUDIO:
                await self._emit(await self._call(self._stream.close))
                return True
            if item is Signal.CLIENT_GONE:
                return False
            if item is None:
                self._check_idle(loop.time() - last_audio)
            else:
                await self._call(self._stream.send, item)
                audio_events, last_audio = audio_events + 1, loop.time()
                audio_bytes += len(item)
            await self._emit(await self._call(self._stream.poll))
            fault = self._fault
            if (
                fault is not None
                and item is not None
                and fault.due(audio_events, audio_bytes // bytes_per_ms)
            ):
                if fault.drop_connection:
                    self._drop()
                    return False
                raise ServiceError(str(fault.exception), fault.message)

    def _check_idle(self, idle_s: float) -> None:
        # The service's own words: clients may recognise the timeout by them.
        if idle_s >= self._timing.idle_timeout_s:
            raise ServiceError(
                "BadRequestException",
                "Your request timed out because no new audio was received for "
                f"{self._timing.idle_timeout_s:g} seconds.",
            )

    async def _next_item(self) -> bytes | Signal | None:
        """The next queued item, or None after a poll interval without one."""
        # One long-lived getter: cancelling Queue.get on a timeout could lose an item.
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._body.items.get())
        done, _ = await asyncio.wait({self._getter}, timeout=self._timing.poll_interval_s)
        if not done:
            return None
        item = self._getter.result()
        self._getter = None
        return item

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        # Engines may compute for a while; keep the event loop (and other streams) moving.
        try:
            return await asyncio.to_thread(method, *args)
        except Exception as error:
            raise service_error_for(error) from error

    async def _emit(self, hypotheses: list[tuple[str | None, Hypothesis]]) -> None:
        if hypotheses:
            events = b"".join(transcript_event(h, channel) for channel, h in hypotheses)
            await self._send_body(events, more=True)

    async def _send_body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})
