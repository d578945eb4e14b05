"""Build the sample call and the WER utterance set from public-domain recordings.

Re-runnable: reads its sources from where registry packages put them, passes
every piece through a telephone channel (8 kHz, 300-3400 Hz band-pass, G.711
mu-law round trip, a little line noise) and writes 8 kHz 16-bit mono WAVs with
reference transcripts. See SOURCES.md for the sources and their licences.

Sources:
- ``two_cities.wav`` from the ``moonshine-voice`` 0.1.5 wheel (PyPI), read
  straight out of the wheel file (nothing is installed or imported):
  ``pip download --no-deps moonshine-voice==0.1.5 -d /tmp/mv``.
- Debian's ``pocketsphinx-testdata`` (``apt-get install pocketsphinx-testdata``)
  under ``/usr/share/pocketsphinx/test/data``.

Usage: ``python samples/make_sample_call.py --wheel /tmp/mv/moonshine_voice-0.1.5-*.whl``
"""

from __future__ import annotations

import argparse
import io
import json
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

RATE = 8000
TESTDATA = Path("/usr/share/pocketsphinx/test/data")
TWO_CITIES_MEMBER = "moonshine_voice/assets/two_cities.wav"
RNG_SEED = 20240601
SPEECH_RMS_DBFS = -20.0
LINE_NOISE_DBFS = -66.0
TURN_GAP_S = 0.8
PHRASE_GAP_S = 0.45
LEAD_S = 0.6
TAIL_S = 1.2


@dataclass(frozen=True)
class Phrase:
    """One spoken phrase: where it is in its source and what is said in it."""

    source: str  # "two_cities", or a path relative to TESTDATA
    start_ms: int  # slice of the source (0, 0 = whole file)
    end_ms: int
    text: str


def tc(start_ms: int, end_ms: int, text: str) -> Phrase:
    """A phrase of the A Tale of Two Cities reading (cut points sit in pauses)."""
    return Phrase("two_cities", start_ms, end_ms, text)


def ss(clip: str, text: str) -> Phrase:
    """A whole clip of the Sense and Sensibility reading in pocketsphinx-testdata."""
    return Phrase(f"librivox/sense_and_sensibility_01_austen_64kb-{clip}.wav", 0, 0, text)


def td(path: str, text: str) -> Phrase:
    """A whole pocketsphinx-testdata clip (CMU test recordings)."""
    return Phrase(path, 0, 0, text)


# Agent: the Two Cities reader, who reads these phrases as Dickens wrote them.
# Texts are what is spoken (checked with two recognisers, see SOURCES.md).
AGENT_TURNS: list[list[Phrase]] = [
    [tc(905, 4790, "It was the best of times, it was the worst of times,")],
    [
        tc(4790, 6430, "it was the age of wisdom,"),
        tc(6430, 8500, "it was the age of foolishness,"),
    ],
    [
        tc(8500, 10525, "it was the epoch of belief,"),
        tc(10525, 13130, "it was the epoch of incredulity,"),
    ],
    [
        tc(13130, 14950, "it was the season of Light,"),
        tc(14950, 17120, "it was the season of Darkness,"),
    ],
    [
        tc(17120, 18850, "it was the spring of hope,"),
        tc(18850, 20850, "it was the winter of despair,"),
    ],
]

# Customer: the Sense and Sensibility reader (texts from the package's
# transcription file, which records the reader's slip "a more a amiable").
CUSTOMER_TURNS: list[list[Phrase]] = [
    [ss("0880", "He was not an ill-disposed young man,")],
    [ss("0890", "unless to be rather cold-hearted and rather selfish is to be ill-disposed:")],
    [
        ss(
            "0870",
            "And Mr. John Dashwood had then leisure to consider how much there might be"
            " prudently in his power to do for them.",
        )
    ],
    [ss("0930", "He might even have been made amiable himself;")],
    [
        ss(
            "0920",
            "Had he married a more a amiable woman, he might have been made still more"
            " respectable than he was;",
        )
    ],
]

UTTERANCES: list[Phrase] = [
    tc(20850, 24325, "we had everything before us, we had nothing before us,"),
    # The reader drops "were" here (Dickens: "we were all going direct to Heaven").
    tc(24325, 26265, "we all going direct to Heaven,"),
    tc(26265, 29765, "we were all going direct the other way, in short,"),
    tc(29765, 32505, "the period was so far like the present period,"),
    tc(32505, 36725, "that some of its noisiest authorities insisted on its being received,"),
    tc(36725, 38515, "for good or for evil,"),
    tc(38515, 42255, "in the superlative degree of comparison only."),
    td("cards/001.wav", "ten of clubs"),
    td("cards/002.wav", "four queen of clubs"),
    td("cards/003.wav", "seven of clubs"),
    td("cards/004.wav", "five five"),
    td("cards/005.wav", "eight of spades four of clubs seven of hearts"),
    td("goforward.raw", "go forward ten meters"),
    td("something.raw", "go somewhere and do something"),
]


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit WAV bytes -> float32 samples in [-1, 1) and the sample rate."""
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"expected 16-bit mono WAV, got {w.getparams()}")
        rate = w.getframerate()
        pcm = w.readframes(w.getnframes())
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0, rate


def write_wav(path: Path, samples: np.ndarray) -> None:
    """Write float samples as 8 kHz 16-bit mono PCM."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(samples * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())


class Sources:
    """Loads source recordings once, resampled to 8 kHz."""

    def __init__(self, wheel: Path, testdata: Path) -> None:
        self._wheel = wheel
        self._testdata = testdata
        self._cache: dict[str, np.ndarray] = {}

    def audio(self, source: str) -> np.ndarray:
        """The whole source recording at 8 kHz."""
        if source not in self._cache:
            samples, rate = self._load(source)
            self._cache[source] = soxr.resample(samples, rate, RATE, quality="HQ")
        return self._cache[source]

    def _load(self, source: str) -> tuple[np.ndarray, int]:
        if source == "two_cities":
            with zipfile.ZipFile(self._wheel) as wheel:
                return read_wav(wheel.read(TWO_CITIES_MEMBER))
        path = self._testdata / source
        if path.suffix == ".raw":  # CMU test audio: headerless 16 kHz s16le
            return np.fromfile(path, "<i2").astype(np.float32) / 32768.0, 16000
        return read_wav(path.read_bytes())


def frame_db(x: np.ndarray, frame: int = RATE // 100) -> np.ndarray:
    """Energy of 10 ms frames in dBFS."""
    n = len(x) // frame
    power = np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1)
    return 10.0 * np.log10(power + 1e-12)


def speech_bounds(x: np.ndarray, margin_s: float) -> tuple[int, int]:
    """Sample range [start, end) of the speech in `x`, widened by a margin.

    Speech = runs of >= 3 frames at least 15 dB above the piece's noise floor
    (its 10th-percentile frame energy), which also ignores isolated clicks.
    """
    db = frame_db(x)
    loud = db > np.percentile(db, 10) + 15.0
    runs = np.convolve(loud.astype(int), np.ones(3, dtype=int), mode="valid") == 3
    idx = np.flatnonzero(runs)
    if idx.size == 0:
        raise ValueError("no speech found in a phrase")
    frame = RATE // 100
    margin = int(margin_s * RATE)
    return max(0, int(idx[0]) * frame - margin), min(len(x), (int(idx[-1]) + 3) * frame + margin)


def phrase_audio(sources: Sources, phrase: Phrase) -> tuple[np.ndarray, int, int]:
    """The phrase at 8 kHz, trimmed and levelled, and its speech span in samples."""
    full = sources.audio(phrase.source)
    if phrase.end_ms:
        full = full[phrase.start_ms * RATE // 1000 : phrase.end_ms * RATE // 1000]
    # A margin keeps weak edge consonants that the energy threshold misses.
    start, end = speech_bounds(full, margin_s=0.12)
    core_start, core_end = speech_bounds(full, margin_s=0.0)
    speech = full[start:end]
    db = frame_db(speech)
    active = db > np.max(db) - 30.0
    rms = np.sqrt(np.mean(10.0 ** (db[active] / 10.0)))
    levelled = speech * (10.0 ** (SPEECH_RMS_DBFS / 20.0) / rms)
    return levelled, core_start - start, core_end - start


def band_pass(x: np.ndarray, low: float = 300.0, high: float = 3400.0) -> np.ndarray:
    """Telephone band: zero-phase FFT mask with 100 Hz raised-cosine skirts."""
    spectrum = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / RATE)
    gain = np.ones_like(freqs)
    skirt = 100.0
    lo = np.clip((freqs - (low - skirt)) / skirt, 0.0, 1.0)
    hi = np.clip(((high + skirt) - freqs) / skirt, 0.0, 1.0)
    gain = gain * (0.5 - 0.5 * np.cos(np.pi * lo)) * (0.5 - 0.5 * np.cos(np.pi * hi))
    return np.fft.irfft(spectrum * gain, n=len(x)).astype(np.float32)


def mulaw_round_trip(x: np.ndarray) -> np.ndarray:
    """G.711 mu-law encode to 8-bit codes and decode back (segment/mantissa form)."""
    pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int32)
    sign = pcm < 0
    magnitude = np.minimum(np.abs(pcm) >> 2, 8158) + 33  # 14-bit magnitude + bias
    exponent = np.floor(np.log2(magnitude)).astype(np.int32) - 5
    mantissa = (magnitude >> (exponent + 1)) & 0x0F
    # Decode the (sign, exponent, mantissa) code word back to linear.
    decoded = (((mantissa << 1) + 33) << exponent) - 33
    linear = np.where(sign, -decoded, decoded) << 2
    return (linear / 32768.0).astype(np.float32)


def telephone(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Line noise, band-pass, mu-law: what a PSTN leg does to 8 kHz audio."""
    noise = rng.standard_normal(len(x)).astype(np.float32) * 10.0 ** (LINE_NOISE_DBFS / 20.0)
    return mulaw_round_trip(band_pass(x + noise))


def place(track: np.ndarray, at: int, audio: np.ndarray) -> None:
    """Add `audio` into `track` starting at sample `at`."""
    track[at : at + len(audio)] += audio


def build_call(sources: Sources, out: Path, rng: np.random.Generator) -> float:
    """Alternate agent and customer turns; write both tracks and reference.json."""
    turns: list[tuple[str, list[Phrase]]] = []
    for agent, customer in zip(AGENT_TURNS, CUSTOMER_TURNS, strict=True):
        turns += [("AUDIO_TO_CUSTOMER", agent), ("AUDIO_FROM_CUSTOMER", customer)]
    placed: list[tuple[str, int, np.ndarray, dict[str, object]]] = []
    cursor = int(LEAD_S * RATE)
    for track, phrases in turns:
        for i, phrase in enumerate(phrases):
            audio, speech_start, speech_end = phrase_audio(sources, phrase)
            span = {
                "track": track,
                "start_ms": (cursor + speech_start) * 1000 // RATE,
                "end_ms": (cursor + speech_end) * 1000 // RATE,
                "text": phrase.text,
            }
            placed.append((track, cursor, audio, span))
            gap = PHRASE_GAP_S if i < len(phrases) - 1 else TURN_GAP_S
            cursor += len(audio) + int(gap * RATE)
    length = cursor - int(TURN_GAP_S * RATE) + int(TAIL_S * RATE)
    tracks = {t: np.zeros(length, np.float32) for t in ("AUDIO_FROM_CUSTOMER", "AUDIO_TO_CUSTOMER")}
    reference = []
    for track, at, audio, span in placed:
        place(tracks[track], at, audio)
        reference.append(span)
    write_wav(out / "call" / "customer.wav", telephone(tracks["AUDIO_FROM_CUSTOMER"], rng))
    write_wav(out / "call" / "agent.wav", telephone(tracks["AUDIO_TO_CUSTOMER"], rng))
    (out / "call" / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    return length / RATE


def build_utterances(sources: Sources, out: Path, rng: np.random.Generator) -> int:
    """One short WAV per phrase (0.3 s of line around it) plus transcripts.json."""
    pad = np.zeros(int(0.3 * RATE), np.float32)
    listing = []
    for n, phrase in enumerate(UTTERANCES, start=1):
        audio = np.concatenate([pad, phrase_audio(sources, phrase)[0], pad])
        name = f"utt{n:02d}.wav"
        write_wav(out / "utterances" / name, telephone(audio, rng))
        listing.append({"file": name, "text": phrase.text, "source": phrase.source})
    (out / "utterances" / "transcripts.json").write_text(json.dumps(listing, indent=1) + "\n")
    return len(listing)


def main() -> None:
    """Parse arguments and write samples/call and samples/utterances."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, required=True, help="moonshine_voice-0.1.5 wheel")
    parser.add_argument("--testdata", type=Path, default=TESTDATA)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sources = Sources(args.wheel, args.testdata)
    rng = np.random.default_rng(RNG_SEED)
    seconds = build_call(sources, args.out, rng)
    count = build_utterances(sources, args.out, rng)
    print(f"call: {seconds:.1f} s per track; utterances: {count}")


if __name__ == "__main__":
    main()
