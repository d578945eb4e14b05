"""The speech-engine port: every engine (Amazon Transcribe, offline) speaks this.

A `RecognitionStream` is one audio track of one call. Audio goes in as 8 kHz
16-bit signed little-endian mono PCM; hypotheses come out with times in
milliseconds relative to the first sample sent on that stream. The caller
(the transcriber core) shifts them to call-relative time.

How a stream fails is part of the port: engines translate their library's
exceptions into `SpeechEngineError`s at the boundary, and raise them from
`RecognitionStream.poll()` / `close()` once the stream has failed. The
transcriber decides what to do: reopen a stream and resend the audio after a
`RetryableSpeechError`; give up on the track after a `FatalSpeechError`,
which retrying cannot cure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from callstream.errors import CallstreamError, RetryableError


@dataclass(frozen=True)
class Word:
    """One recognised word with stream-relative times and, when known, confidence."""

    text: str
    start_ms: int
    end_ms: int
    confidence: float | None = None


@dataclass(frozen=True)
class Hypothesis:
    """A partial or final transcript of one utterance.

    `result_id` is stable across the partials of one utterance and its final,
    so a consumer can replace partials by the final.
    """

    result_id: str
    start_ms: int
    end_ms: int
    text: str
    is_partial: bool
    words: tuple[Word, ...] = field(default_factory=tuple)


class RecognitionStream(Protocol):
    """One track's live recognition session."""

    def send(self, pcm: bytes) -> None:
        """Queue 8 kHz s16le mono PCM, contiguous with what was sent before."""

    def poll(self) -> list[Hypothesis]:
        """Hypotheses that became ready since the last call; never blocks for long."""

    def close(self) -> list[Hypothesis]:
        """End of audio: flush and return every remaining hypothesis (finals last)."""


class SpeechEngine(Protocol):
    """Opens recognition streams; one engine instance serves every call of a process."""

    name: str

    def open_stream(self, *, contact_id: str, track: str, language: str) -> RecognitionStream:
        """Start recognising one track of one call."""


class SpeechEngineError(CallstreamError):
    """A recognition stream failed; the message says what happened.

    `code` is the engine's own name for the failure (for Amazon Transcribe the
    exception name, such as ``LimitExceededException``). `hypotheses` holds
    results the stream had received but not yet handed out when it failed.
    """

    def __init__(
        self, message: str, *, code: str = "", hypotheses: tuple[Hypothesis, ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.hypotheses = hypotheses


class RetryableSpeechError(SpeechEngineError, RetryableError):
    """Transient: throttled, service unavailable or failing, connection dropped."""


class FatalSpeechError(SpeechEngineError):
    """Retrying will not help: a bad request, missing or rejected credentials, bad setup."""
