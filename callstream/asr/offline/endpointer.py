"""Splits one track's 8 kHz audio into utterances: a VAD plus hangover, as a pure state machine.

Frames of 30 ms are classified by pocketsphinx's WebRTC-style voice activity
detector (`pocketsphinx.Vad`, aggressiveness 2). On the sample call it finds
every utterance without splitting one, and with white noise added at
-35 dBFS (15 dB SNR) it still does, where a plain energy VAD with an adaptive
floor split 7 of 14 utterances and pocketsphinx's own `Endpointer` (or the
VAD at aggressiveness 0-1) took the whole noisy track for speech.

The hangover around it: the VAD's first `warmup_ms` (it calls them speech
while it learns the line noise) are ignored; an utterance opens after
`start_ms` of consecutive speech frames (so clicks never open one), reaching
back `preroll_ms`; it
closes after `end_ms` without speech, keeping `postroll_ms`; one that reaches
`max_ms` is cut at its quietest 90 ms after half that length, and the rest
goes on as a new utterance. Positions are sample counts from the stream start,
so the result does not depend on how the audio was chunked.

Restart at every utterance's end: when an utterance closes (not a forced
cut), the VAD is started afresh at its speech end and the frames since then
are classified again; the next utterance may reach back to that speech end.
That is exactly the state of an endpointer whose stream starts there, which
is where the transcriber restarts a stream after a failure or a takeover
(the end of the last final): a resumed stream then finds the same next
utterances as an undisturbed one, to the sample. Without it, the VAD's
adaptive noise estimate, built over the whole stream, placed them 30-90 ms
differently (tests/integration/test_transcriber_takeover.py).

Defaults, measured with bench/asr_offline.py: `end_ms` 400 (was 600) splits the
sample call and the utterance set exactly as 600 did; 300, 250 and even 200
split no phrase of either, but cut the call's turns at the 0.7 s gaps
between phrases, so 400 keeps a margin for real mid-sentence pauses.
`preroll_ms`/`postroll_ms` 150 (was 200): less line noise in each clip took
the utterance-set WER from 11.4 % to 6.8 % and the call's from 2.3 % to 1.5 %.
The WER over pre/postroll 50-250 ms is noisy (6.8-12.5 % on 88 words, one word
is 1.1 points) and was tuned on these same sets, so read it as "150 is no
worse", not as a general gain: with white noise added (two seeds) 150 ms was
worse than 200 at -45 dBFS (utterances 13.6/19.3 % vs 15.9/13.6 %) and better
at -35 dBFS (33/38 % vs 39/42 %); the call's WER was the same or better.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from pocketsphinx import Vad

from callstream.audio import SAMPLE_RATE


@dataclass(frozen=True)
class EndpointerConfig:
    """Tuning of the hangover; times in milliseconds."""

    frame_ms: int = 30
    vad_mode: int = 2
    warmup_ms: int = 150
    start_ms: int = 120
    end_ms: int = 400
    preroll_ms: int = 150
    postroll_ms: int = 150
    max_ms: int = 20_000

    def samples(self, ms: int) -> int:
        """Milliseconds as 8 kHz samples."""
        return ms * SAMPLE_RATE // 1000


@dataclass(frozen=True)
class Utterance:
    """Sample positions of one utterance: audio to decode, and the speech inside it."""

    audio_start: int
    speech_start: int
    speech_end: int  # while open: the end of the last speech frame so far
    audio_end: int


@dataclass(frozen=True)
class Opened:
    """An utterance began; more audio will follow."""

    utterance: Utterance


@dataclass(frozen=True)
class Closed:
    """An utterance is complete; `forced` when cut at the maximum length."""

    utterance: Utterance
    forced: bool = False


Event = Opened | Closed


class Endpointer:
    """Utterance boundaries of one track: feed 16-bit samples, get Opened/Closed events."""

    def __init__(self, config: EndpointerConfig | None = None) -> None:
        self.config = config or EndpointerConfig()
        self._vad = self._new_vad()
        self._frame = self._vad.frame_bytes // 2
        self._pending = np.zeros(0, np.int16)
        self.position = 0  # samples classified so far
        self._vad_start = 0  # where the current VAD began listening
        self._run = 0  # consecutive speech frames while closed
        self._last_end = 0  # where the next utterance may reach back to
        self._open: Utterance | None = None
        # The frames since the last speech, to classify again after a restart.
        self._recent: deque[np.ndarray] = deque(
            maxlen=self.config.samples(self.config.end_ms) // self._frame + 2
        )
        # Energy of the latest frames (enough to cover one maximal utterance).
        max_frames = self.config.samples(self.config.max_ms) // self._frame + 2
        self._energy: deque[float] = deque(maxlen=max_frames)

    @property
    def open_utterance(self) -> Utterance | None:
        """The utterance in progress, if any."""
        return self._open

    def reach_back(self) -> int:
        """The earliest sample that an open or future utterance can include."""
        if self._open is not None:
            return self._open.audio_start
        speech_start = self.position - self._run * self._frame
        return max(self._last_end, speech_start - self.config.samples(self.config.preroll_ms))

    def push(self, samples: np.ndarray) -> list[Event]:
        """Classify every whole frame now available; return the boundary events."""
        data = np.concatenate([self._pending, samples.astype(np.int16, copy=False)])
        events: list[Event] = []
        whole = len(data) - len(data) % self._frame
        for at in range(0, whole, self._frame):
            events += self._step(data[at : at + self._frame])
        self._pending = data[whole:]
        return events

    def flush(self, total_samples: int) -> list[Event]:
        """End of stream at `total_samples`: close the open utterance, if any."""
        if self._open is None:
            return []
        u = self._open
        end = min(total_samples, u.speech_end + self.config.samples(self.config.postroll_ms))
        return [self._close(Utterance(u.audio_start, u.speech_start, u.speech_end, end))]

    def _step(self, frame: np.ndarray) -> list[Event]:
        # The VAD calls its first frames speech while it learns the line's
        # noise, so nothing it says during the warm-up counts.
        warm = self.position - self._vad_start >= self.config.samples(self.config.warmup_ms)
        speech = bool(self._vad.is_speech(frame.tobytes())) and warm
        self.position += len(frame)
        self._recent.append(frame)
        self._energy.append(float(np.mean(frame.astype(np.float32) ** 2)))
        if self._open is None:
            self._run = self._run + 1 if speech else 0
            if self._run * self._frame >= self.config.samples(self.config.start_ms):
                return [self._begin(self.position - self._run * self._frame)]
            return []
        u = self._open
        if speech:
            u = self._open = Utterance(u.audio_start, u.speech_start, self.position, self.position)
        else:
            u = self._open = Utterance(u.audio_start, u.speech_start, u.speech_end, self.position)
        if self.position - u.speech_end >= self.config.samples(self.config.end_ms):
            end = u.speech_end + self.config.samples(self.config.postroll_ms)
            closed = self._close(Utterance(u.audio_start, u.speech_start, u.speech_end, end))
            return [closed, *self._restart(u.speech_end)]
        if self.position - u.audio_start >= self.config.samples(self.config.max_ms):
            return self._cut(u)
        return []

    def _new_vad(self) -> Vad:
        return Vad(self.config.vad_mode, SAMPLE_RATE, self.config.frame_ms / 1000)

    def _restart(self, at: int) -> list[Event]:
        """Listen afresh from `at` (a frame boundary behind us), as a stream started there."""
        count = (self.position - at) // self._frame
        frames = list(self._recent)[len(self._recent) - count :] if count else []
        for _ in frames:
            self._recent.pop()
            self._energy.pop()
        self._vad = self._new_vad()
        self.position = self._vad_start = self._last_end = at
        self._run = 0
        events: list[Event] = []
        for frame in frames:
            events += self._step(frame)
        return events

    def _begin(self, speech_start: int, *, preroll: bool = True) -> Opened:
        reach = self.config.samples(self.config.preroll_ms) if preroll else 0
        start = max(self._last_end, speech_start - reach)
        self._open = Utterance(start, speech_start, self.position, self.position)
        self._run = 0
        return Opened(self._open)

    def _close(self, utterance: Utterance, *, forced: bool = False) -> Closed:
        self._open = None
        self._last_end = utterance.audio_end
        return Closed(utterance, forced)

    def _cut(self, u: Utterance) -> list[Event]:
        """Split an over-long utterance at its quietest point in the second half."""
        smoothed = np.convolve(np.asarray(self._energy), np.ones(3) / 3, mode="same")
        first_frame = self.position // self._frame - len(smoothed)  # frame index of [0]
        halfway = (u.audio_start + u.audio_end) // 2
        lo = max(0, -(-halfway // self._frame) - first_frame)
        quietest = lo + int(np.argmin(smoothed[lo:]))
        cut = (first_frame + quietest + 1) * self._frame
        head = Utterance(u.audio_start, u.speech_start, min(u.speech_end, cut), cut)
        return [self._close(head, forced=True), self._begin(cut, preroll=False)]
