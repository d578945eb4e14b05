"""One request body, read in its own task into a queue of audio payloads and end markers."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging

from amazon_transcribe.eventstream import ParserError

from callstream_emulator.transcribe.asgi import Receive
from callstream_emulator.transcribe.codec import AudioDecoder
from callstream_emulator.transcribe.faults import StreamRecord

_log = logging.getLogger(__name__)


class Signal(enum.Enum):
    """Markers between audio payloads on a request's queue."""

    END_OF_AUDIO = "end of audio"
    CLIENT_GONE = "client gone"


class RequestBody:
    """Reads one request body in its own task.

    Hypercorn hands body chunks to the app through a small bounded queue and
    blocks the whole connection while it is full, so the body is always read
    promptly, whatever the engine is doing.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.items: asyncio.Queue[bytes | Signal] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.record: StreamRecord | None = None

    async def run(self) -> None:
        decoder = AudioDecoder()
        try:
            while True:
                message = await self._receive()
                if message["type"] != "http.request":
                    break
                for item in decoder.feed(message.get("body", b"")):
                    self._take(item)
                if not message.get("more_body", False):
                    break
        except ParserError as error:
            _log.warning("undecodable audio stream: %s", error)
        finally:
            self.finished.set()
            self.items.put_nowait(Signal.CLIENT_GONE)

    def _take(self, item: bytes | None) -> None:
        if self.record is not None:
            if item is None:
                self.record.ended_by_client = True
            else:
                self.record.audio_events += 1
                self.record.audio_bytes += len(item)
        self.items.put_nowait(Signal.END_OF_AUDIO if item is None else item)

    async def drain(self, timeout_s: float) -> None:
        """Wait until the client has ended its request, so the stream can close cleanly."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished.wait(), timeout_s)
