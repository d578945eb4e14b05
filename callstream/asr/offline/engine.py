"""The offline speech engine: Moonshine base-en on ONNX Runtime, no network.

Per stream: 8 kHz PCM is endpointed into utterances (`callstream.asr.offline.endpointer`),
and each range is upsampled to 16 kHz by soxr (HQ) when decoded; `poll()` decodes each
closed utterance into a final and, while one is open, re-decodes it now and
then for a partial. Partials are spaced by 0.6 s of audio at first, then by
the utterance's length so far (a partial at 0.6, 1.2, 2.4, 4.8 s...): each
re-decodes the whole utterance, so this keeps their cost under twice the
final's. Spacing by half the length cost 35 % more CPU with partials on
(bench/asr_offline.py) for one more partial on a 3 s utterance. Moonshine
gives no word timings, so `words` is empty.

Early finals: once the endpointer's postroll has passed after the last speech,
the range the final will have if nobody speaks again is already known, so it
is decoded then, during the end hangover, and shown as a partial. When the
utterance closes with exactly that range the final reuses the text (same
samples, same decoder, so the same text as a late decode); if speech resumed,
the final is decoded as usual. This takes the decoding time out of the final's
latency (bench/asr_offline.py, with the 400 ms hangover: p50 0.95 s -> 0.56 s
after the VAD's speech end, 0.78 s after the reference phrase end) at the
price of one wasted decode per pause of 150-400 ms. Each decoded range is
upsampled on its own rather than by a soxr stream, which released its output
in ~100 ms blocks and so held the early decode back.

Overload: a poll that finds more than 1 s of audio queued is behind real
time; it skips partials and early finals, which would be stale, and decodes
only finals until it has caught up.

`send()` only queues bytes; all work happens in `poll()` and `close()`, which
are synchronous (the transcriber runs streams in a thread pool). One model is
loaded per process and shared by every stream.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from callstream.asr.offline.endpointer import (
    Closed,
    Endpointer,
    EndpointerConfig,
    Opened,
    Utterance,
)
from callstream.asr.offline.moonshine import SAMPLE_RATE as MODEL_RATE
from callstream.asr.offline.moonshine import MoonshineModel, Transcript
from callstream.asr.port import FatalSpeechError, Hypothesis
from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE

log = logging.getLogger(__name__)

ENGINE_NAME = "offline-moonshine-base-en"
SUPPORTED_LANGUAGE = "en"
_FIRST_PARTIAL_S = 0.6
_EMPTY_RETRY_S = 0.3  # next partial after a first one that heard nothing
_PARTIAL_BACKOFF = 1.0  # next partial after max(0.6 s, this x the utterance so far)
# A poll that takes in more than this much audio is behind real time: it skips
# partials (stale by then) and spends the CPU on finals, which catch it up.
_BEHIND_S = 1.0
_SLICE_BYTES = 10 * SAMPLE_RATE * BYTES_PER_SAMPLE  # audio taken in per step

_models: dict[tuple[Path | None, int], MoonshineModel] = {}
_models_lock = threading.Lock()


def shared_model(model_dir: Path | None = None, threads: int = 1) -> MoonshineModel:
    """The process's one model for these settings, loaded on first use."""
    key = (model_dir.resolve() if model_dir else None, threads)
    with _models_lock:
        if key not in _models:
            _models[key] = MoonshineModel(model_dir, threads)
        return _models[key]


def check_language(language: str) -> None:
    """Accept English in any region ("en", "en-US", "en_GB"); else a ValueError."""
    if re.split(r"[-_]", language.strip(), maxsplit=1)[0].lower() != SUPPORTED_LANGUAGE:
        raise ValueError(
            f"the offline engine ({ENGINE_NAME}) recognises English only "
            f"(language 'en' or 'en-*', e.g. 'en-US'); got {language!r}"
        )


class OfflineEngine:
    """Opens offline recognition streams that share one Moonshine model."""

    name = ENGINE_NAME

    def __init__(
        self,
        model_dir: Path | None = None,
        partials: bool = True,
        threads: int = 1,
        endpointer: EndpointerConfig | None = None,
    ) -> None:
        self.model = shared_model(model_dir, threads)
        self.partials = partials
        self.endpointer = endpointer or EndpointerConfig()

    def open_stream(self, *, contact_id: str, track: str, language: str) -> OfflineStream:
        """Start recognising one track of one call (English only)."""
        check_language(language)
        return OfflineStream(self.model, contact_id, track, self.partials, self.endpointer)


@dataclass(frozen=True)
class _EarlyFinal:
    """A final decoded before its utterance closed: the 8 kHz range and its text."""

    audio_start: int
    audio_end: int
    text: str


@dataclass
class _OpenUtterance:
    """Partial-decoding state of the utterance in progress."""

    result_id: str
    next_partial: int  # utterance length (8 kHz samples) that triggers the next partial
    last_text: str = ""
    last_tokens: tuple[int, ...] = ()
    decoded_speech_end: int = -1
    early: _EarlyFinal | None = None


@dataclass(frozen=True)
class _PendingFinal:
    result_id: str
    utterance: Utterance
    had_partials: bool
    early: _EarlyFinal | None


class _Audio:
    """8 kHz samples (floats) of a stream, addressed by absolute index, old ones dropped."""

    def __init__(self) -> None:
        self.start = 0
        self.samples = np.zeros(0, np.float32)

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    def append(self, samples: np.ndarray) -> None:
        if len(samples):
            self.samples = np.concatenate([self.samples, samples])

    def slice(self, start: int, end: int) -> np.ndarray:
        return self.samples[max(0, start - self.start) : max(0, end - self.start)]

    def drop_before(self, index: int) -> None:
        index = min(index, self.end)
        if index > self.start:
            self.samples = self.samples[index - self.start :]
            self.start = index


class OfflineStream:
    """One track's recognition: queue audio with send(), collect hypotheses with poll()."""

    def __init__(
        self,
        model: MoonshineModel,
        contact_id: str,
        track: str,
        partials: bool,
        config: EndpointerConfig,
    ) -> None:
        self.contact_id = contact_id
        self.track = track
        self._model = model
        self._partials = partials
        self._endpointer = Endpointer(config)
        self._audio = _Audio()
        self._inbox: list[bytes] = []
        self._inbox_lock = threading.Lock()
        self._work_lock = threading.Lock()
        self._odd_byte = b""
        self._received = 0  # 8 kHz samples ingested
        self._open: _OpenUtterance | None = None
        self._finals: list[_PendingFinal] = []
        self._closed = False
        self._failure: FatalSpeechError | None = None

    def send(self, pcm: bytes) -> None:
        """Queue 8 kHz s16le mono PCM; cheap, never decodes."""
        if self._closed:
            raise RuntimeError(f"send() on a closed stream ({self.contact_id} {self.track})")
        with self._inbox_lock:
            self._inbox.append(bytes(pcm))

    def poll(self) -> list[Hypothesis]:
        """Decode what is ready: finals of closed utterances, maybe a partial."""
        with self._work_lock:
            if self._closed:
                return []
            out: list[Hypothesis] = []
            self._guarded(out, last=False)
            return out

    def close(self) -> list[Hypothesis]:
        """End of audio: close the open utterance and return every remaining final."""
        with self._work_lock:
            if self._closed:
                return []
            out: list[Hypothesis] = []
            self._guarded(out, last=True)
            self._closed = True
            return out

    def _guarded(self, out: list[Hypothesis], *, last: bool) -> None:
        """Ingest and decode into `out`; a decoding failure fails the stream for good."""
        if self._failure is not None:
            raise self._failure
        try:
            self._work(out, last=last)
        except FatalSpeechError as error:
            self._failure = FatalSpeechError(str(error), code=error.code)
            raise FatalSpeechError(str(error), code=error.code, hypotheses=tuple(out)) from error

    def _work(self, out: list[Hypothesis], *, last: bool) -> None:
        """Take the queued audio a slice at a time (bounding memory however much
        was queued), decoding finals as they close; then maybe a partial."""
        with self._inbox_lock:
            data, self._inbox = self._odd_byte + b"".join(self._inbox), []
        whole = len(data) - len(data) % 2
        data, self._odd_byte = data[:whole], data[whole:]
        slices = [data[at : at + _SLICE_BYTES] for at in range(0, len(data), _SLICE_BYTES)]
        for n, piece in enumerate(slices or [b""]):
            self._ingest(np.frombuffer(piece, "<i2"), last=last and n == max(0, len(slices) - 1))
            self._decode_finals(out)
            self._trim()
        behind = len(data) > _BEHIND_S * SAMPLE_RATE * BYTES_PER_SAMPLE
        if self._open is not None and not last and not behind:
            out += self._decode_early_final(self._open)
            if self._partials:
                out += self._decode_partial(self._open)

    def _ingest(self, samples: np.ndarray, *, last: bool) -> None:
        """Move samples through the endpointer into the stream's audio."""
        self._received += len(samples)
        events = self._endpointer.push(samples)
        if last:
            events += self._endpointer.flush(self._received)
        self._audio.append(samples.astype(np.float32) / 32768.0)
        for event in events:
            self._on_event(event)

    def _on_event(self, event: Opened | Closed) -> None:
        u = event.utterance
        # Derived from the audio offset, so a replay yields the same ids.
        result_id = f"{self.contact_id}:{self.track}:{u.speech_start * 1000 // SAMPLE_RATE}"
        if isinstance(event, Opened):
            self._open = _OpenUtterance(result_id, int(_FIRST_PARTIAL_S * SAMPLE_RATE))
            return
        had_partials = self._open is not None and bool(self._open.last_text)
        early = self._open.early if self._open is not None else None
        self._finals.append(_PendingFinal(result_id, u, had_partials, early))
        self._open = None

    def _decode_finals(self, out: list[Hypothesis]) -> None:
        # A final is decoded from its whole range, the same samples however
        # the audio was chunked.
        while self._finals and self._audio.end >= self._finals[0].utterance.audio_end:
            pending = self._finals.pop(0)
            u, early = pending.utterance, pending.early
            if early is not None and (early.audio_start, early.audio_end) == (
                u.audio_start,
                u.audio_end,
            ):
                text = early.text  # decoded from these very samples during the hangover
            else:
                text = self._recognise(u.audio_start, u.audio_end)
            if text or pending.had_partials:  # an empty final retires shown partials
                out.append(self._hypothesis(pending.result_id, pending.utterance, text, False))

    def _decode_early_final(self, state: _OpenUtterance) -> list[Hypothesis]:
        """Once the postroll after the last speech has arrived, decode the range
        the final will have if no speech follows, while the end hangover runs.

        The final reuses the text only if its range is exactly this one, so it
        is still decoded from the same samples whenever polls happened. Shown
        as a partial, too: it is the best guess so far.
        """
        u = self._endpointer.open_utterance
        if u is None:
            return []
        config = self._endpointer.config
        end = u.speech_end + config.samples(config.postroll_ms)
        if u.audio_end < end or self._audio.end < end:
            return []  # still speaking, or the postroll is not all here yet
        if state.early is not None and state.early.audio_end == end:
            return []
        state.early = _EarlyFinal(u.audio_start, end, self._recognise(u.audio_start, end))
        text = state.early.text
        if not self._partials or not text or text == state.last_text:
            return []
        state.last_text = text
        return [self._hypothesis(state.result_id, u, text, True)]

    def _decode_partial(self, state: _OpenUtterance) -> list[Hypothesis]:
        u = self._endpointer.open_utterance
        if u is None or u.speech_end == state.decoded_speech_end:
            return []  # nothing open, or no new speech since the last partial
        config = self._endpointer.config
        if u.audio_end - u.speech_end >= config.samples(config.postroll_ms):
            return []  # a pause: the early final stands for this speech
        available = min(u.audio_end, self._audio.end)
        length = available - u.audio_start
        if length < state.next_partial:
            return []
        step = max(int(_FIRST_PARTIAL_S * SAMPLE_RATE), int(_PARTIAL_BACKOFF * length))
        state.next_partial = length + step
        state.decoded_speech_end = u.speech_end
        result = self._transcribe(u.audio_start, available, draft=state.last_tokens)
        state.last_tokens = result.tokens
        text = tidy(result.text)
        if not text and not state.last_text:
            # Nothing recognised yet (a slow start): try again soon rather than
            # after the utterance's length. On the sample call this brought the
            # two late first partials from 1.2 s to 0.9 s after speech start.
            state.next_partial = length + int(_EMPTY_RETRY_S * SAMPLE_RATE)
        if not text or text == state.last_text:
            return []
        state.last_text = text
        return [self._hypothesis(state.result_id, u, text, True)]

    def _recognise(self, start: int, end: int) -> str:
        """Transcript of the 8 kHz sample range [start, end), tidied.

        Finals take no draft: decoded from the audio alone, they are the same
        however the audio was chunked and whenever partials were taken.
        """
        return tidy(self._transcribe(start, end).text)

    def _transcribe(self, start: int, end: int, draft: tuple[int, ...] = ()) -> Transcript:
        # Resampled per decode, from the range alone: no stream state (a soxr
        # stream held back ~100 ms of output), and the same samples give the
        # same input to the model however the audio arrived.
        audio = soxr.resample(self._audio.slice(start, end), SAMPLE_RATE, MODEL_RATE)
        try:
            return self._model.transcribe(audio, draft=draft)
        except Exception as error:  # onnxruntime's errors derive from Exception only
            message = (
                f"Moonshine decoding failed on {self.contact_id} {self.track} "
                f"(samples {start}-{end}): {error}"
            )
            raise FatalSpeechError(message, code=type(error).__name__) from error

    def _hypothesis(self, result_id: str, u: Utterance, text: str, partial: bool) -> Hypothesis:
        return Hypothesis(
            result_id=result_id,
            start_ms=u.speech_start * 1000 // SAMPLE_RATE,
            end_ms=u.speech_end * 1000 // SAMPLE_RATE,
            text=text,
            is_partial=partial,
        )

    def _trim(self) -> None:
        """Forget audio no pending or future utterance can reach back to."""
        keep = self._endpointer.reach_back()
        if self._finals:
            keep = min(keep, self._finals[0].utterance.audio_start)
        self._audio.drop_before(max(0, keep))


# A phrase of 1-4 words said four or more times in a row: a decoding loop.
_REPEAT = re.compile(r"\b((?:\S+\s+){0,3}?\S+?)(?:[\s,.;!?-]+\1\b){3,}", re.IGNORECASE)


def tidy(text: str) -> str:
    """Guard against non-speech output: text without a letter or digit is
    dropped, and a decoding loop (a phrase four or more times) is kept once."""
    text = " ".join(text.split())
    if not any(ch.isalnum() for ch in text):
        return ""
    return _REPEAT.sub(r"\1", text)
