"""Amazon Transcribe streaming behind the speech-engine port.

The amazon-transcribe SDK is asyncio; the port is synchronous. One engine owns
one event loop, run by a background thread and shared by every stream of the
process. A stream's `send()` hands audio to that loop
(`loop.call_soon_threadsafe`), a task per stream writes it to Transcribe and
puts the hypotheses that come back on a thread-safe queue, which `poll()`
drains. `close()` ends the audio and waits, for a bounded time, for the last
results.

Failures are translated into `callstream.asr.port` at this boundary and
raised from `poll()` / `close()` once the stream has failed. Resending audio
after a `RetryableSpeechError` is the caller's job; `sent_ms` says how much
audio this stream handed to Transcribe.

`open_stream(..., channels=2)` opens one stream of interleaved 2-channel PCM
with channel identification; its results carry the channel's index
(`poll_channels`, `take_results`). `callstream.asr.transcribe.stereo` builds the
one-stream-per-call engine on it.

A custom `endpoint_url` must be https://: the SDK negotiates HTTP/2 only through
TLS ALPN. awscrt reads `SSL_CERT_FILE` when the client's TLS context is created,
which happens in `TranscribeEngine.__init__`: to trust a private CA (the local
endpoint's), set it before constructing the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from amazon_transcribe.client import TranscribeStreamingClient
from amazon_transcribe.endpoints import StaticEndpointResolver
from amazon_transcribe.exceptions import (
    CredentialsException,
    HTTPException,
    ServiceException,
    UnknownServiceException,
)
from amazon_transcribe.model import (
    AudioStream,
    Item,
    StartStreamTranscriptionEventStream,
    TranscriptEvent,
    TranscriptResultStream,
)
from awscrt.exceptions import AwsCrtError

from callstream.asr.port import (
    FatalSpeechError,
    Hypothesis,
    RetryableSpeechError,
    SpeechEngineError,
    Word,
)
from callstream.audio import BYTES_PER_MS, BYTES_PER_SAMPLE, SAMPLE_RATE

_log = logging.getLogger(__name__)

# Transcribe takes events of up to 32 KiB and recommends 50-200 ms of audio each.
_MAX_EVENT_BYTES = 200 * BYTES_PER_MS
_RETRYABLE_CODES = frozenset(
    {
        "LimitExceededException",
        "ServiceUnavailableException",
        "InternalFailureException",
        "ThrottlingException",
    }
)


@dataclass(frozen=True)
class StreamSettings:
    """Per-stream Transcribe options other than the language; validated on creation."""

    vocabulary_name: str | None = None
    vocabulary_filter_name: str | None = None
    vocabulary_filter_method: str | None = None
    partial_results_stability: str | None = None
    pii_entity_types: tuple[str, ...] = ()
    content_redaction_type: str | None = None
    content_identification_type: str | None = None

    def __post_init__(self) -> None:
        _check_choice(
            "vocabulary_filter_method", self.vocabulary_filter_method, {"remove", "mask", "tag"}
        )
        _check_choice(
            "partial_results_stability", self.partial_results_stability, {"low", "medium", "high"}
        )
        _check_choice("content_redaction_type", self.content_redaction_type, {"PII"})
        _check_choice("content_identification_type", self.content_identification_type, {"PII"})
        if self.vocabulary_filter_method and not self.vocabulary_filter_name:
            raise ValueError("vocabulary_filter_method needs a vocabulary_filter_name")
        if self.content_redaction_type and self.content_identification_type:
            raise ValueError("set content_redaction_type or content_identification_type, not both")
        if self.pii_entity_types and not (
            self.content_redaction_type or self.content_identification_type
        ):
            raise ValueError(
                "pii_entity_types needs content_redaction_type or content_identification_type"
            )

    def request_args(self, language: str, channels: int = 1) -> dict[str, Any]:
        """Keyword arguments for `TranscribeStreamingClient.start_stream_transcription`."""
        if channels not in (1, 2):
            raise ValueError(f"Transcribe streams carry 1 or 2 channels, got {channels}")
        return {
            "language_code": language,
            "media_sample_rate_hz": SAMPLE_RATE,
            "media_encoding": "pcm",
            "vocabulary_name": self.vocabulary_name,
            "vocab_filter_name": self.vocabulary_filter_name,
            "vocab_filter_method": self.vocabulary_filter_method,
            "enable_partial_results_stabilization": True
            if self.partial_results_stability
            else None,
            "partial_results_stability": self.partial_results_stability,
            "pii_entity_types": list(self.pii_entity_types) or None,
            "content_redaction_type": self.content_redaction_type,
            "content_identification_type": self.content_identification_type,
            "enable_channel_identification": True if channels == 2 else None,
            "number_of_channels": 2 if channels == 2 else None,
        }


def _check_choice(name: str, value: str | None, allowed: set[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


# --- results -------------------------------------------------------------------------


def hypotheses_from(event: TranscriptEvent) -> list[Hypothesis]:
    """The results of one TranscriptEvent: first alternative, words without punctuation."""
    return [hypothesis for _, hypothesis in channel_hypotheses_from(event)]


def channel_hypotheses_from(event: TranscriptEvent) -> list[tuple[int, Hypothesis]]:
    """`hypotheses_from`, each with its channel's index ("ch_1" is 1; none is 0)."""
    hypotheses = []
    for result in event.transcript.results:
        if not result.alternatives:
            continue
        alternative = result.alternatives[0]
        hypothesis = Hypothesis(
            result_id=result.result_id or "",
            start_ms=_ms(result.start_time),
            end_ms=_ms(result.end_time),
            text=alternative.transcript or "",
            is_partial=bool(result.is_partial),
            words=_words(alternative.items or ()),
        )
        hypotheses.append((_channel_index(result.channel_id), hypothesis))
    return hypotheses


def _channel_index(channel_id: str | None) -> int:
    if not channel_id:
        return 0
    try:
        return int(channel_id.removeprefix("ch_"))
    except ValueError:
        message = f"Amazon Transcribe sent a ChannelId {channel_id!r}; expected ch_0, ch_1"
        raise FatalSpeechError(message) from None


def _words(items: Iterable[Item]) -> tuple[Word, ...]:
    # Punctuation items are left out: the hypothesis text carries punctuation already.
    return tuple(
        Word(item.content, _ms(item.start_time), _ms(item.end_time), item.confidence)
        for item in items
        if item.item_type != "punctuation" and item.content
    )


def _ms(seconds: float | None) -> int:
    return round((seconds or 0.0) * 1000)


# --- errors ----------------------------------------------------------------------------


def translate_error(error: BaseException) -> SpeechEngineError:
    """A callstream error saying what happened, for any SDK, awscrt or network failure."""
    if isinstance(error, SpeechEngineError):
        return error
    if isinstance(error, ServiceException):
        return _service_error(error)
    if isinstance(error, CredentialsException):
        return FatalSpeechError(f"no usable AWS credentials for Amazon Transcribe: {error}")
    if isinstance(error, HTTPException):
        if "HTTP/2" in str(error):
            return FatalSpeechError(f"Amazon Transcribe endpoint does not speak HTTP/2: {error}")
        return RetryableSpeechError(f"could not reach Amazon Transcribe: {error}")
    if isinstance(error, AwsCrtError):
        text = f"connection to Amazon Transcribe failed: {error.name}: {error.message}"
        if "TLS" in error.name:
            return FatalSpeechError(
                f"{text} (is the endpoint's CA trusted? see SSL_CERT_FILE)", code=error.name
            )
        return RetryableSpeechError(text, code=error.name)
    if isinstance(error, OSError | TimeoutError):
        return RetryableSpeechError(f"connection to Amazon Transcribe failed: {error!r}")
    return FatalSpeechError(f"Amazon Transcribe stream failed unexpectedly: {error!r}")


def _service_error(error: ServiceException) -> SpeechEngineError:
    message = getattr(error, "message", "") or str(error)
    if isinstance(error, UnknownServiceException):
        code, status = str(error.error_code), int(error.status_code)
        text = f"Amazon Transcribe refused the stream with {code} (HTTP {status}): {message}"
        if code in _RETRYABLE_CODES or status == 429 or status >= 500:
            return RetryableSpeechError(text, code=code)
        return FatalSpeechError(text, code=code)
    code = type(error).__name__
    text = f"Amazon Transcribe {code}: {message}"
    if code in _RETRYABLE_CODES or _is_audio_timeout(code, message):
        return RetryableSpeechError(text, code=code)
    return FatalSpeechError(text, code=code)


def _is_audio_timeout(code: str, message: str) -> bool:
    # Transcribe ends a stream that got no audio for 15 s as a bad request, yet a new
    # stream cures it; only the message tells this apart from a truly bad request.
    return code == "BadRequestException" and "no new audio was received" in message


def _transport_failure(event_stream: StartStreamTranscriptionEventStream) -> BaseException | None:
    """How the HTTP/2 stream under the results ended, when it failed.

    The SDK ends the result iterator quietly when the connection drops, so the
    awscrt stream's completion is asked directly. This reaches into SDK
    internals (amazon-transcribe 0.6.x) and answers None if their shape changes.
    """
    response = getattr(event_stream.output_stream, "_raw_stream", None)
    future = getattr(getattr(response, "_stream", None), "completion_future", None)
    if future is None or not future.done() or future.cancelled():
        return None
    failure: BaseException | None = future.exception()
    return failure


# --- one stream --------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamContext:
    contact_id: str
    track: str
    language: str
    open_timeout_s: float
    close_timeout_s: float
    channels: int = 1

    def log_extra(self) -> dict[str, str]:
        return {"contact_id": self.contact_id, "track": self.track}


class TranscribeStream:
    """One track's Amazon Transcribe session, driven from synchronous code.

    Thread-safe between one producer (`send`) and one consumer (`poll`,
    `close`), which may be different threads. A 2-channel stream takes
    interleaved frames; `poll_channels()` / `take_results()` say which
    channel each result is for.
    """

    def __init__(
        self,
        client: TranscribeStreamingClient,
        settings: StreamSettings,
        loop: asyncio.AbstractEventLoop,
        context: _StreamContext,
    ) -> None:
        self._client = client
        self._settings = settings
        self._loop = loop
        self._context = context
        self._audio: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._results: queue.SimpleQueue[tuple[int, Hypothesis]] = queue.SimpleQueue()
        self._frame_bytes = BYTES_PER_SAMPLE * context.channels
        self._max_event_bytes = _MAX_EVENT_BYTES - _MAX_EVENT_BYTES % self._frame_bytes
        self._finished = threading.Event()
        self._failure: SpeechEngineError | None = None
        self._carry = b""
        self._sent_bytes = 0
        self._end_sent = False
        self._input_ended = False
        self._closing = False
        self._session_id: str | None = None
        self._task = asyncio.run_coroutine_threadsafe(self._run(), loop)

    @property
    def sent_ms(self) -> int:
        """Milliseconds of audio handed to Transcribe so far (from the stream's start)."""
        return self._sent_bytes // (BYTES_PER_MS * self._context.channels)

    @property
    def session_id(self) -> str | None:
        """Transcribe's session id, once the service has accepted the stream."""
        return self._session_id

    @property
    def failure(self) -> SpeechEngineError | None:
        """Why the stream failed, once it has; None while it runs or after a clean end."""
        return self._failure

    @property
    def finished(self) -> bool:
        """The stream is over: all results are in, or it failed."""
        return self._finished.is_set()

    def send(self, pcm: bytes) -> None:
        """Queue 8 kHz s16le PCM (frames of interleaved channels); dropped once failed."""
        if self._closing:
            raise RuntimeError("send() after close() on a Transcribe stream")
        if self._finished.is_set():
            return
        # Keep events frame-aligned even if a caller splits a frame across sends.
        data = self._carry + pcm
        cut = len(data) - len(data) % self._frame_bytes
        self._carry = data[cut:]
        if cut:
            self._loop.call_soon_threadsafe(self._audio.put_nowait, data[:cut])

    def poll(self) -> list[Hypothesis]:
        """Hypotheses received so far; raises the stream's error once they are handed out."""
        return [hypothesis for _, hypothesis in self.poll_channels()]

    def poll_channels(self) -> list[tuple[int, Hypothesis]]:
        """`poll()`, each hypothesis with its channel's index."""
        hypotheses = self.take_results()
        if not hypotheses and self._failure is not None:
            raise self._failure
        return hypotheses

    def take_results(self) -> list[tuple[int, Hypothesis]]:
        """(channel, hypothesis) received so far; never raises (see `failure`)."""
        hypotheses = []
        with contextlib.suppress(queue.Empty):
            while True:
                hypotheses.append(self._results.get_nowait())
        return hypotheses

    def close(self) -> list[Hypothesis]:
        """End the audio, wait for the last results (bounded) and return what is left."""
        self.end_audio()
        self.wait_finished()
        hypotheses = [hypothesis for _, hypothesis in self.take_results()]
        if self._failure is not None:
            error = self._failure
            raise type(error)(str(error), code=error.code, hypotheses=tuple(hypotheses)) from error
        return hypotheses

    def end_audio(self) -> None:
        """No more audio: Transcribe finishes its last results. Does not wait."""
        if not self._closing:
            self._closing = True
            if not self._finished.is_set():
                self._loop.call_soon_threadsafe(self._audio.put_nowait, None)

    def wait_finished(self) -> None:
        """Wait, up to the close timeout, for the stream to end; then it has failed."""
        if not self._finished.wait(self._context.close_timeout_s):
            self._task.cancel()
            self._finished.wait(1.0)
            self._failure = RetryableSpeechError(
                f"Amazon Transcribe sent no end of results within "
                f"{self._context.close_timeout_s:.1f} s of the end of audio"
            )

    # The methods below run on the engine's event loop.

    async def _run(self) -> None:
        extra = self._context.log_extra()
        try:
            event_stream = await self._start()
            self._session_id = event_stream.response.session_id
            _log.info("Transcribe stream %s started", self._session_id, extra=extra)
            await self._exchange(event_stream)
        except asyncio.CancelledError:
            self._failure = RetryableSpeechError("Transcribe stream cancelled: engine closed")
            _log.warning("Transcribe stream %s cancelled", self._session_id, extra=extra)
        except Exception as error:
            self._failure = translate_error(error)
            session = self._session_id or "(not started)"
            _log.warning("Transcribe stream %s failed: %s", session, self._failure, extra=extra)
        else:
            _log.info("Transcribe stream %s ended", self._session_id, extra=extra)
        finally:
            self._finished.set()

    async def _start(self) -> StartStreamTranscriptionEventStream:
        args = self._settings.request_args(self._context.language, self._context.channels)
        timeout_s = self._context.open_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._client.start_stream_transcription(**args)
        except TimeoutError:
            # The SDK waits forever for response headers when a connection dies first.
            raise RetryableSpeechError(
                f"Amazon Transcribe did not accept the stream within {timeout_s:.1f} s"
            ) from None

    async def _exchange(self, event_stream: StartStreamTranscriptionEventStream) -> None:
        writer = asyncio.create_task(self._write_audio(event_stream.input_stream))
        reader = asyncio.create_task(self._read_results(event_stream.output_stream))
        try:
            await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # a failed write
                await reader  # all audio is out: wait for the last results
            else:
                reader.result()  # an exception event, or the results ended early
        finally:
            await _cancel(writer, reader)
            await self._end_audio_quietly(event_stream.input_stream)
        failure = _transport_failure(event_stream)
        if failure is not None:
            raise failure
        if not self._end_sent:
            raise RetryableSpeechError("Amazon Transcribe ended the stream before the end of audio")

    async def _write_audio(self, audio_stream: AudioStream) -> None:
        while True:
            pcm, more = await self._next_audio()
            for start in range(0, len(pcm), self._max_event_bytes):
                chunk = pcm[start : start + self._max_event_bytes]
                await audio_stream.send_audio_event(audio_chunk=chunk)
                self._sent_bytes += len(chunk)
            if not more:
                break
        self._end_sent = self._input_ended = True
        await audio_stream.end_stream()

    async def _next_audio(self) -> tuple[bytes, bool]:
        """All audio queued by now (waiting for some), and whether more may follow."""
        parts = [await self._audio.get()]
        while parts[-1] is not None and not self._audio.empty():
            parts.append(self._audio.get_nowait())
        return b"".join(p for p in parts if p is not None), parts[-1] is not None

    async def _read_results(self, output_stream: TranscriptResultStream) -> None:
        async for event in output_stream:
            if isinstance(event, TranscriptEvent):
                for tagged in channel_hypotheses_from(event):
                    self._results.put(tagged)

    async def _end_audio_quietly(self, audio_stream: AudioStream) -> None:
        # Ending the request body lets the HTTP/2 stream finish after a failure too.
        if not self._input_ended:
            self._input_ended = True
            with contextlib.suppress(Exception):
                await audio_stream.end_stream()


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the engine ----------------------------------------------------------------------


class _LoopThread:
    """An asyncio event loop run by a daemon thread, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name=self._name, daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop

    def stop(self, timeout_s: float) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if not thread.is_alive():
            loop.close()


async def _cancel_all() -> None:
    current = asyncio.current_task()
    await _cancel(*(task for task in asyncio.all_tasks() if task is not current))


class TranscribeEngine:
    """Amazon Transcribe streaming as a `SpeechEngine`: one client and one event loop per engine.

    `endpoint_url` replaces the regional endpoint (https:// only); credentials
    come from the AWS default chain. Streams are 8 kHz PCM in the language
    passed to `open_stream` (`default_language` when that is empty).
    """

    name = "transcribe"

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        default_language: str = "en-US",
        vocabulary_name: str | None = None,
        vocabulary_filter_name: str | None = None,
        vocabulary_filter_method: str | None = None,
        partial_results_stability: str | None = None,
        pii_entity_types: Sequence[str] = (),
        content_redaction_type: str | None = None,
        content_identification_type: str | None = None,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 10.0,
    ) -> None:
        if endpoint_url is not None and not endpoint_url.startswith("https://"):
            raise ValueError(
                f"Transcribe endpoint_url must be https:// (HTTP/2 needs TLS), got {endpoint_url!r}"
            )
        self._settings = StreamSettings(
            vocabulary_name=vocabulary_name,
            vocabulary_filter_name=vocabulary_filter_name,
            vocabulary_filter_method=vocabulary_filter_method,
            partial_results_stability=partial_results_stability,
            pii_entity_types=tuple(pii_entity_types),
            content_redaction_type=content_redaction_type,
            content_identification_type=content_identification_type,
        )
        self._default_language = default_language
        self._timeouts = (open_timeout_s, close_timeout_s)
        resolver = StaticEndpointResolver(endpoint_url) if endpoint_url else None
        # Creates the TLS context now, which is when awscrt reads SSL_CERT_FILE.
        self._client = TranscribeStreamingClient(region=region, endpoint_resolver=resolver)
        self._loop_thread = _LoopThread("transcribe-engine")

    def open_stream(
        self, *, contact_id: str, track: str, language: str, channels: int = 1
    ) -> TranscribeStream:
        """Start a Transcribe session for one track (or, with `channels=2`, a stereo
        stream with channel identification); failures surface from poll()/close()."""
        if channels not in (1, 2):
            raise ValueError(f"Transcribe streams carry 1 or 2 channels, got {channels}")
        context = _StreamContext(
            contact_id, track, language or self._default_language, *self._timeouts, channels
        )
        return TranscribeStream(self._client, self._settings, self._loop_thread.loop(), context)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel every open stream and stop the engine's event loop."""
        self._loop_thread.stop(timeout_s)

    def __enter__(self) -> TranscribeEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
