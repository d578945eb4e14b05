"""The ASGI application: one `StartStreamTranscription` request per call, refused or served."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid

from callstream.asr.port import RecognitionStream, SpeechEngine
from callstream_emulator.transcribe.asgi import Receive, Scope, Send
from callstream_emulator.transcribe.body import RequestBody
from callstream_emulator.transcribe.channels import Channels
from callstream_emulator.transcribe.errors import EXCEPTION_STATUS, ServiceError, service_error_for
from callstream_emulator.transcribe.faults import Ledger, StreamRecord
from callstream_emulator.transcribe.params import StartParams, start_params
from callstream_emulator.transcribe.relay import Relay
from callstream_emulator.transcribe.session import StreamSession, Timing

_log = logging.getLogger(__name__)


class TranscribeApp:
    """The ASGI application: one call per `StartStreamTranscription` request."""

    def __init__(self, engine: SpeechEngine, ledger: Ledger, relay: Relay, timing: Timing) -> None:
        self._engine = engine
        self._ledger = ledger
        self._relay = relay
        self._timing = timing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = RequestBody(receive)
        reader = asyncio.create_task(body.run())
        try:
            await self._serve_stream(scope, body, send)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _serve_stream(self, scope: Scope, body: RequestBody, send: Send) -> None:
        try:
            params = start_params(scope)
        except ServiceError as error:
            await self._refuse(send, body, error)
            return
        fault = self._ledger.take_fault()
        body.record = StreamRecord(
            params.session_id,
            params.language_code,
            params.sample_rate,
            fault=fault,
            channels=params.channels,
        )
        self._ledger.add_record(body.record)
        client_port = scope["client"][1]
        if fault is not None and fault.at_start:
            if fault.drop_connection:
                self._relay.drop(client_port)
            else:
                await self._refuse(send, body, ServiceError(str(fault.exception), fault.message))
            return
        try:
            stream = await asyncio.to_thread(self._open_streams, params)
        except Exception as error:
            await self._refuse(send, body, service_error_for(error))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _ok_headers(params)})
        drop = functools.partial(self._relay.drop, client_port)
        await StreamSession(stream, body, send, fault, drop, self._timing).run()

    def _open_streams(self, params: StartParams) -> Channels:
        tracks = [f"ch_{i}" for i in range(params.channels)] if params.channels > 1 else [""]
        streams: list[RecognitionStream] = []
        try:
            for track in tracks:
                streams.append(
                    self._engine.open_stream(
                        contact_id=params.session_id,
                        track=track or "transcribe-streaming",
                        language=params.language_code,
                    )
                )
        except Exception:
            Channels(streams).close_quietly()
            raise
        return Channels(streams)

    async def _refuse(self, send: Send, body: RequestBody, error: ServiceError) -> None:
        _log.info("refusing stream: %s", error)
        headers = [
            (b"content-type", b"application/json"),
            (b"x-amzn-errortype", error.name.encode()),
            (b"x-amzn-requestid", str(uuid.uuid4()).encode()),
        ]
        status = EXCEPTION_STATUS.get(error.name, 400)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        payload = json.dumps({"Message": error.message}).encode("utf-8")
        await send({"type": "http.response.body", "body": payload, "more_body": True})
        await body.drain(self._timing.drain_timeout_s)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _ok_headers(params: StartParams) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/vnd.amazon.eventstream"),
        (b"x-amzn-request-id", str(uuid.uuid4()).encode()),
    ]
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in params.echoed)
    return headers


async def _serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
