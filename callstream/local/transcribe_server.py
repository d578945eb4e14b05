"""A local Amazon Transcribe streaming endpoint, backed by any `SpeechEngine`.

It speaks the service's wire protocol closely enough for the unchanged
amazon-transcribe client (and so `callstream.asr.transcribe.TranscribeEngine`)
to run against it without AWS:

- `POST /stream-transcription` over HTTP/2 and TLS, parameters in
  `x-amzn-transcribe-*` headers, echoed back on a 200 response;
- request body: event-stream messages, each a signed envelope (`:date`,
  `:chunk-signature`) whose payload is an inner `AudioEvent` message; an
  envelope with an empty payload ends the audio (signatures are not checked);
- response body: one `TranscriptEvent` message (JSON) per hypothesis of the
  engine, or an exception message such as `LimitExceededException`;
- a stream refused at start gets an HTTP error status, `x-amzn-errortype` and a
  JSON `{"Message": ...}` body;
- a stream that receives no audio for `idle_timeout_s` (15 s, as the service
  does) fails with the service's `BadRequestException`;
- channel identification (`enable-channel-identification`, `number-of-channels`
  2): the interleaved frames are split, each channel is recognised by its own
  engine stream, and every result carries its `ChannelId` ("ch_0", "ch_1"),
  with an id unique across the channels.

Faults (`Fault`) are injected per stream, in the order streams open: fail with a
service exception at start or after N audio events, or drop the TCP connection.
Drops need a TCP relay in front of hypercorn, because ASGI gives an app no handle
on its connection; the relay is always there so every test takes the same path.

The server keeps a stream open after an exception until the client ends its
audio (bounded by `drain_timeout_s`): hypercorn cannot reset a single HTTP/2
stream, and data arriving for a stream it already closed tears down the whole
connection, with every other stream on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import json
import logging
import shutil
import socket
import string
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple, cast

import hypercorn.asyncio
import hypercorn.config
import numpy as np
from amazon_transcribe.eventstream import (
    EventStreamBuffer,
    EventStreamMessageSerializer,
    ParserError,
)

from callstream.asr.base import (
    BYTES_PER_SAMPLE,
    SAMPLE_RATE,
    Hypothesis,
    RecognitionStream,
    SpeechEngine,
    Word,
)
from callstream.asr.errors import FatalSpeechError, RetryableSpeechError
from callstream.local.tls import TlsFiles, make_local_tls

_log = logging.getLogger(__name__)

STREAM_PATH = "/stream-transcription"
_PARAM_PREFIX = "x-amzn-transcribe-"
_HOST = "127.0.0.1"

# The HTTP status the service answers with when it refuses a stream at start.
EXCEPTION_STATUS: Mapping[str, int] = MappingProxyType(
    {
        "BadRequestException": 400,
        "SerializationException": 400,
        "UnrecognizedClientException": 403,
        "ConflictException": 409,
        "LimitExceededException": 429,
        "InternalFailureException": 500,
        "ServiceUnavailableException": 503,
    }
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Fault:
    """What goes wrong with one stream: a service exception, or a dropped connection.

    `after_audio_events=0` acts at start: an exception becomes an HTTP error
    response, a drop closes the connection before any response.
    `after_audio_ms`, when set, acts instead once that much audio (per
    channel) was taken in: unlike a count of events, it does not depend on
    how a loaded client batched its audio into events.
    """

    exception: str | None = None
    after_audio_events: int = 0
    drop_connection: bool = False
    message: str = "fault injected by the local Transcribe endpoint"
    after_audio_ms: int | None = None

    @property
    def at_start(self) -> bool:
        """The fault refuses the stream before any audio."""
        return self.after_audio_events == 0 and self.after_audio_ms is None

    def due(self, audio_events: int, audio_ms: int) -> bool:
        """Whether the fault strikes now, after this many events and ms of audio."""
        if self.after_audio_ms is not None:
            return audio_ms >= self.after_audio_ms
        return audio_events == self.after_audio_events

    def __post_init__(self) -> None:
        if self.drop_connection == (self.exception is not None):
            raise ValueError("a Fault either names an exception or drops the connection")
        if self.exception is not None and self.exception not in EXCEPTION_STATUS:
            known = ", ".join(sorted(EXCEPTION_STATUS))
            raise ValueError(f"unknown exception {self.exception!r}; expected one of {known}")
        if self.after_audio_events < 0:
            raise ValueError(f"after_audio_events must be >= 0, got {self.after_audio_events}")

    @classmethod
    def fail(
        cls,
        exception: str,
        *,
        after_audio_events: int = 0,
        after_audio_ms: int | None = None,
        message: str = "",
    ) -> Fault:
        """Fail the stream with the named service exception."""
        return cls(
            exception,
            after_audio_events,
            message=message or cls.message,
            after_audio_ms=after_audio_ms,
        )

    @classmethod
    def drop(cls, *, after_audio_events: int = 0, after_audio_ms: int | None = None) -> Fault:
        """Abort the stream's TCP connection (and so every stream sharing it)."""
        return cls(None, after_audio_events, drop_connection=True, after_audio_ms=after_audio_ms)


class ServerAddress(NamedTuple):
    """Where the endpoint listens and the CA file a client must trust to reach it."""

    url: str
    ca_file: Path


@dataclass
class StreamRecord:
    """What the endpoint saw of one stream, for assertions in tests."""

    session_id: str
    language_code: str
    sample_rate: int
    audio_events: int = 0
    audio_bytes: int = 0
    ended_by_client: bool = False
    fault: Fault | None = None
    channels: int = 1


class _ServiceError(Exception):
    """A refusal in the service's own terms: exception name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


# --- event-stream codec -------------------------------------------------------------


class _AudioDecoder:
    """Turns request body bytes into audio payloads; `None` marks the end of audio."""

    def __init__(self) -> None:
        self._envelopes = EventStreamBuffer()

    def feed(self, data: bytes) -> list[bytes | None]:
        self._envelopes.add_data(data)
        out: list[bytes | None] = []
        for envelope in self._envelopes:
            if not envelope.payload:
                out.append(None)
                continue
            inner = EventStreamBuffer()
            inner.add_data(envelope.payload)
            for message in inner:
                if message.headers.get(":event-type") == "AudioEvent":
                    out.append(bytes(message.payload))
                else:
                    _log.debug("ignoring event %s", message.headers.get(":event-type"))
        return out


def _encode(headers: dict[str, Any], body: Mapping[str, Any]) -> bytes:
    payload = json.dumps(body).encode("utf-8")
    return EventStreamMessageSerializer().serialize(headers, payload)


def _transcript_event(hypothesis: Hypothesis, channel_id: str | None) -> bytes:
    headers = {
        ":message-type": "event",
        ":event-type": "TranscriptEvent",
        ":content-type": "application/json",
    }
    result = _result_json(hypothesis)
    if channel_id is not None:
        result["ChannelId"] = channel_id
    return _encode(headers, {"Transcript": {"Results": [result]}})


def _exception_event(name: str, message: str) -> bytes:
    headers = {
        ":message-type": "exception",
        ":exception-type": name,
        ":content-type": "application/json",
    }
    return _encode(headers, {"Message": message})


def _result_json(hypothesis: Hypothesis) -> dict[str, Any]:
    alternative = {
        "Transcript": hypothesis.text,
        "Items": [_item_json(word) for word in hypothesis.words],
    }
    return {
        "ResultId": hypothesis.result_id,
        "StartTime": hypothesis.start_ms / 1000,
        "EndTime": hypothesis.end_ms / 1000,
        "IsPartial": hypothesis.is_partial,
        "Alternatives": [alternative],
    }


def _item_json(word: Word) -> dict[str, Any]:
    punctuation = bool(word.text) and all(c in string.punctuation for c in word.text)
    item: dict[str, Any] = {
        "StartTime": word.start_ms / 1000,
        "EndTime": word.end_ms / 1000,
        "Type": "punctuation" if punctuation else "pronunciation",
        "Content": word.text,
        "VocabularyFilterMatch": False,
    }
    if word.confidence is not None:
        item["Confidence"] = word.confidence
    return item


def _service_error_for(error: Exception) -> _ServiceError:
    """How an engine failure looks to a client of the service."""
    if isinstance(error, RetryableSpeechError):
        return _ServiceError("ServiceUnavailableException", str(error))
    if isinstance(error, FatalSpeechError | ValueError):
        return _ServiceError("BadRequestException", str(error))
    return _ServiceError("InternalFailureException", f"{type(error).__name__}: {error}")


# --- request parameters -------------------------------------------------------------


@dataclass(frozen=True)
class _StartParams:
    language_code: str
    sample_rate: int
    session_id: str
    echoed: tuple[tuple[str, str], ...]
    channels: int = 1


def _start_params(scope: Scope) -> _StartParams:
    """Validate a start request the way the service would; raise `_ServiceError` if not."""
    if scope["method"] != "POST" or scope["path"] != STREAM_PATH:
        raise _ServiceError("BadRequestException", f"no operation at {scope['path']}")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    if "authorization" not in headers:
        raise _ServiceError("UnrecognizedClientException", "the request is not signed")
    language = headers.get(_PARAM_PREFIX + "language-code", "")
    if not language:
        raise _ServiceError("BadRequestException", "a language code is required")
    rate = headers.get(_PARAM_PREFIX + "sample-rate", "")
    if rate != str(SAMPLE_RATE):
        raise _ServiceError(
            "BadRequestException", f"sample rate must be {SAMPLE_RATE} Hz here, got {rate!r}"
        )
    encoding = headers.get(_PARAM_PREFIX + "media-encoding", "")
    if encoding != "pcm":
        raise _ServiceError("BadRequestException", f"media encoding must be pcm, got {encoding!r}")
    channels = _channels(headers)
    session_id = headers.get(_PARAM_PREFIX + "session-id") or str(uuid.uuid4())
    echoed = {k: v for k, v in headers.items() if k.startswith(_PARAM_PREFIX)}
    echoed[_PARAM_PREFIX + "session-id"] = session_id
    return _StartParams(language, SAMPLE_RATE, session_id, tuple(echoed.items()), channels)


def _channels(headers: Mapping[str, str]) -> int:
    """1, or 2 with channel identification; the service's own rules otherwise."""
    identify = headers.get(_PARAM_PREFIX + "enable-channel-identification", "false")
    count = headers.get(_PARAM_PREFIX + "number-of-channels")
    if identify.lower() != "true":
        if count is not None:
            raise _ServiceError(
                "BadRequestException", "NumberOfChannels needs EnableChannelIdentification"
            )
        return 1
    if count != "2":
        raise _ServiceError(
            "BadRequestException",
            f"channel identification needs NumberOfChannels 2, got {count!r}",
        )
    if headers.get(_PARAM_PREFIX + "show-speaker-label", "false").lower() == "true":
        raise _ServiceError(
            "BadRequestException", "set ShowSpeakerLabel or EnableChannelIdentification, not both"
        )
    return 2


# --- TCP relay (for dropped connections) ------------------------------------------


class _Relay:
    """Forwards TCP connections to hypercorn and can abort one of them on demand.

    Hypercorn reports the relay's upstream socket as the ASGI `client`, so that
    port names the connection to drop.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._links: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = {}
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_client, _HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def ports(self) -> list[int]:
        return list(self._links)

    def drop(self, upstream_port: int) -> None:
        link = self._links.pop(upstream_port, None)
        if link is None:
            _log.warning("no relayed connection from port %s to drop", upstream_port)
            return
        for writer in link:
            writer.transport.abort()

    async def stop(self) -> None:
        for port in list(self._links):
            self.drop(port)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(_HOST, self._upstream_port)
        except OSError:
            writer.transport.abort()
            return
        port = up_writer.get_extra_info("sockname")[1]
        self._links[port] = (writer, up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._links.pop(port, None)
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except OSError:
        sink.transport.abort()


# --- one stream ------------------------------------------------------------------


class _Signal(enum.Enum):
    """Markers between audio payloads on a request's queue."""

    END_OF_AUDIO = "end of audio"
    CLIENT_GONE = "client gone"


class _RequestBody:
    """Reads one request body in its own task.

    Hypercorn hands body chunks to the app through a small bounded queue and
    blocks the whole connection while it is full, so the body is always read
    promptly, whatever the engine is doing.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self.items: asyncio.Queue[bytes | _Signal] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.record: StreamRecord | None = None

    async def run(self) -> None:
        decoder = _AudioDecoder()
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
            self.items.put_nowait(_Signal.CLIENT_GONE)

    def _take(self, item: bytes | None) -> None:
        if self.record is not None:
            if item is None:
                self.record.ended_by_client = True
            else:
                self.record.audio_events += 1
                self.record.audio_bytes += len(item)
        self.items.put_nowait(_Signal.END_OF_AUDIO if item is None else item)

    async def drain(self, timeout_s: float) -> None:
        """Wait until the client has ended its request, so the stream can close cleanly."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.finished.wait(), timeout_s)


class _Channels:
    """One engine stream per channel of a request: splits interleaved frames, tags results.

    A mono request's results carry no ChannelId. Calls are synchronous: the
    session runs them on a worker thread.
    """

    def __init__(self, streams: list[RecognitionStream]) -> None:
        self._streams = streams
        self._frame = BYTES_PER_SAMPLE * len(streams)
        self._carry = b""

    @property
    def identified(self) -> bool:
        return len(self._streams) > 1

    def send(self, pcm: bytes) -> None:
        if not self.identified:
            self._streams[0].send(pcm)
            return
        data = self._carry + pcm
        cut = len(data) - len(data) % self._frame
        self._carry = data[cut:]
        frames = np.frombuffer(data[:cut], dtype="<i2").reshape(-1, len(self._streams))
        for index, stream in enumerate(self._streams):
            stream.send(frames[:, index].tobytes())

    def poll(self) -> list[tuple[str | None, Hypothesis]]:
        return self._tag([stream.poll() for stream in self._streams])

    def close(self) -> list[tuple[str | None, Hypothesis]]:
        return self._tag([stream.close() for stream in self._streams])

    def close_quietly(self) -> None:
        for stream in self._streams:
            _close_quietly(stream)

    def _tag(self, per_channel: list[list[Hypothesis]]) -> list[tuple[str | None, Hypothesis]]:
        if not self.identified:
            return [(None, hypothesis) for hypothesis in per_channel[0]]
        tagged: list[tuple[str | None, Hypothesis]] = []
        for index, hypotheses in enumerate(per_channel):
            channel = f"ch_{index}"
            # Result ids are unique across channels, as the service's are.
            tagged.extend(
                (channel, dataclasses.replace(h, result_id=f"{channel}-{h.result_id}"))
                for h in hypotheses
            )
        return tagged


class _StreamSession:
    """Feeds one request's audio to its engine stream(s) and sends back what they recognise."""

    def __init__(
        self,
        stream: _Channels,
        body: _RequestBody,
        send: Send,
        fault: Fault | None,
        drop: Callable[[], None],
        timing: _Timing,
    ) -> None:
        self._stream = stream
        self._body = body
        self._send = send
        self._fault = fault
        self._drop = drop
        self._timing = timing
        self._getter: asyncio.Future[bytes | _Signal] | None = None

    async def run(self) -> None:
        try:
            flushed = await self._transcribe()
        except _ServiceError as error:
            _log.info("stream failed with %s", error)
            await self._send_body(_exception_event(error.name, error.message), more=True)
            await self._body.drain(self._timing.drain_timeout_s)
            await self._send_body(b"", more=False)
            await asyncio.to_thread(self._stream.close_quietly)
            return
        finally:
            if self._getter is not None:
                self._getter.cancel()
        if flushed:
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
            if item is _Signal.END_OF_AUDIO:
                await self._emit(await self._call(self._stream.close))
                return True
            if item is _Signal.CLIENT_GONE:
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
                raise _ServiceError(str(fault.exception), fault.message)

    def _check_idle(self, idle_s: float) -> None:
        # The service's own words: clients may recognise the timeout by them.
        if idle_s >= self._timing.idle_timeout_s:
            raise _ServiceError(
                "BadRequestException",
                "Your request timed out because no new audio was received for "
                f"{self._timing.idle_timeout_s:g} seconds.",
            )

    async def _next_item(self) -> bytes | _Signal | None:
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
            raise _service_error_for(error) from error

    async def _emit(self, hypotheses: list[tuple[str | None, Hypothesis]]) -> None:
        if hypotheses:
            events = b"".join(_transcript_event(h, channel) for channel, h in hypotheses)
            await self._send_body(events, more=True)

    async def _send_body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})


def _close_quietly(stream: RecognitionStream) -> None:
    try:
        stream.close()
    except Exception:
        _log.debug("engine stream failed while closing an abandoned stream", exc_info=True)


# --- the ASGI app ------------------------------------------------------------------


@dataclass(frozen=True)
class _Timing:
    poll_interval_s: float
    drain_timeout_s: float
    idle_timeout_s: float


class _Ledger:
    """Faults waiting for streams and records of streams seen; shared across threads."""

    def __init__(self, faults: Iterable[Fault]) -> None:
        self._lock = threading.Lock()
        self._faults = deque(faults)
        self._records: list[StreamRecord] = []

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def add_record(self, record: StreamRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[StreamRecord]:
        with self._lock:
            return [dataclasses.replace(record) for record in self._records]


class _TranscribeApp:
    """The ASGI application: one call per `StartStreamTranscription` request."""

    def __init__(
        self, engine: SpeechEngine, ledger: _Ledger, relay: _Relay, timing: _Timing
    ) -> None:
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
        body = _RequestBody(receive)
        reader = asyncio.create_task(body.run())
        try:
            await self._serve_stream(scope, body, send)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _serve_stream(self, scope: Scope, body: _RequestBody, send: Send) -> None:
        try:
            params = _start_params(scope)
        except _ServiceError as error:
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
                await self._refuse(send, body, _ServiceError(str(fault.exception), fault.message))
            return
        try:
            stream = await asyncio.to_thread(self._open_streams, params)
        except Exception as error:
            await self._refuse(send, body, _service_error_for(error))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _ok_headers(params)})
        drop = functools.partial(self._relay.drop, client_port)
        await _StreamSession(stream, body, send, fault, drop, self._timing).run()

    def _open_streams(self, params: _StartParams) -> _Channels:
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
            _Channels(streams).close_quietly()
            raise
        return _Channels(streams)

    async def _refuse(self, send: Send, body: _RequestBody, error: _ServiceError) -> None:
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


def _ok_headers(params: _StartParams) -> list[tuple[bytes, bytes]]:
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


# --- the server ---------------------------------------------------------------------


class LocalTranscribeServer:
    """The endpoint on 127.0.0.1, run by a background thread with its own event loop.

    `start()` returns the `https://127.0.0.1:PORT` URL and the CA file to trust
    (set `SSL_CERT_FILE` to it before creating an awscrt client); `stop()` ends
    every connection and removes the TLS material. Faults given here or through
    `inject()` are handed to streams in the order the streams open.
    """

    def __init__(
        self,
        engine: SpeechEngine,
        *,
        faults: Iterable[Fault] = (),
        poll_interval_s: float = 0.05,
        drain_timeout_s: float = 10.0,
        idle_timeout_s: float = 15.0,
    ) -> None:
        self._engine = engine
        self._ledger = _Ledger(faults)
        self._timing = _Timing(poll_interval_s, drain_timeout_s, idle_timeout_s)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._shutdown: asyncio.Event | None = None
        self._relay: _Relay | None = None
        self._address: ServerAddress | None = None
        self._failure: BaseException | None = None
        self._tls_dir: Path | None = None

    @property
    def address(self) -> ServerAddress:
        if self._address is None:
            raise RuntimeError("the local Transcribe endpoint is not running")
        return self._address

    def client_env(self) -> dict[str, str | None]:
        """Environment for an unchanged SDK client of this endpoint (None: unset it).

        Dummy static credentials (the endpoint does not check signatures) and
        the CA to trust, which awscrt reads when a client's TLS context is made.
        """
        return {
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_CONFIG_FILE": None,
            "AWS_ACCESS_KEY_ID": "AKIDLOCALTEST",
            "AWS_SECRET_ACCESS_KEY": "local-test-secret",
            "SSL_CERT_FILE": str(self.address.ca_file),
        }

    @property
    def streams(self) -> list[StreamRecord]:
        """Snapshots of every stream started so far, in order."""
        return self._ledger.records()

    def inject(self, fault: Fault) -> None:
        """Give `fault` to the next stream that opens without one."""
        self._ledger.add_fault(fault)

    def start(self, timeout_s: float = 10.0) -> ServerAddress:
        if self._thread is not None:
            raise RuntimeError("the local Transcribe endpoint was already started")
        self._tls_dir = Path(tempfile.mkdtemp(prefix="callstream-transcribe-"))
        tls = make_local_tls(self._tls_dir)
        self._thread = threading.Thread(
            target=self._run, args=(tls,), name="local-transcribe", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._address is None:
            self.stop()
            raise RuntimeError(f"local Transcribe endpoint did not start: {self._failure!r}")
        _log.info("local Transcribe endpoint at %s", self._address.url)
        return self._address

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(self._begin_shutdown)
            thread.join(timeout_s)
            if thread.is_alive():
                _log.warning("local Transcribe endpoint still running after %.1f s", timeout_s)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
        self._address = None

    def __enter__(self) -> LocalTranscribeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, tls: TlsFiles) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(tls))
            loop.run_until_complete(loop.shutdown_default_executor())
        except BaseException as error:
            self._failure = error
            _log.exception("local Transcribe endpoint failed")
        finally:
            loop.close()
            self._ready.set()

    async def _serve(self, tls: TlsFiles) -> None:
        self._shutdown = asyncio.Event()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((_HOST, 0))
        listener.listen()  # before hypercorn adopts it, so early clients queue up
        self._relay = _Relay(listener.getsockname()[1])
        port = await self._relay.start()
        app = _TranscribeApp(self._engine, self._ledger, self._relay, self._timing)
        config = _hypercorn_config(tls, listener.detach())
        self._address = ServerAddress(f"https://{_HOST}:{port}", tls.ca_file)
        self._ready.set()
        try:
            await hypercorn.asyncio.serve(
                cast(Any, app), config, shutdown_trigger=self._shutdown.wait, mode="asgi"
            )
        finally:
            await self._relay.stop()

    def _begin_shutdown(self) -> None:
        # Dropping connections first spares hypercorn's graceful wait for idle clients.
        if self._relay is not None:
            for port in list(self._relay.ports()):
                self._relay.drop(port)
        if self._shutdown is not None:
            self._shutdown.set()


def _hypercorn_config(tls: TlsFiles, listener_fd: int) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"fd://{listener_fd}"]
    config.certfile = str(tls.cert_file)
    config.keyfile = str(tls.key_file)
    config.alpn_protocols = ["h2"]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = _log
    return config
