"""How a recognition stream fails, in callstream's terms.

Engines translate their library's exceptions into these at the boundary, and
raise them from `RecognitionStream.poll()` / `close()` once the stream has
failed. The transcriber decides what to do: reopen a stream and resend the
audio after a `RetryableSpeechError`; give up on the track after a
`FatalSpeechError`, which retrying cannot cure.
"""

from __future__ import annotations

from callstream.asr.base import Hypothesis
from callstream.errors import CallstreamError, RetryableError


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
