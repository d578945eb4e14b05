"""Moonshine base-en speech recognition on ONNX Runtime, from the moonshine-cpp wheel.

The weights ship as ONNX Runtime (``.ort``) files inside the ``moonshine-cpp``
package. That package's own native library needs AVX-512, so it is never
imported: its directory is found with ``importlib.util.find_spec`` (which does
not execute the package) and the files are run with ``onnxruntime``.

Loading: each ``.ort`` model is re-saved as ONNX by onnxruntime, rewritten by
`callstream.asr.offline.onnx_graph` (weights dequantised once instead of on every
call) and loaded from that. Decoding is greedy, with the decoder's key/value
cache: the first step runs the merged decoder's no-cache branch, which also
returns the cross-attention keys/values of the audio; later steps feed back
the self-attention cache and keep the cross-attention one. A draft (the
previous partial's tokens) can be verified in that first step, so a partial
of a growing utterance costs one pass plus the tokens that changed.

Greedy on purpose: a beam search over the same cache (2, 4 or 8 beams,
with and without length normalisation) was measured on the endpointed
utterance set and the sample call (issue #6). With the 200 ms pre/postroll it
fixed two words of 88 ("and sure" -> "in short"); with 150 ms it fixed none and
took the call from 1.5 % to 3.1 % WER, for 1.6x (2 beams) to 6x (8 beams) the
decoding CPU.
Neither the level (0.5x-4x gain, RMS or peak normalisation) nor the
resampler (soxr LQ/HQ/VHQ, linear) nor silence padding moved the WER by more
than a word either way.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from callstream.asr.offline.onnx_graph import prepare_model
from callstream.asr.port import FatalSpeechError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MODEL_PACKAGE = "moonshine-cpp"
MODEL_FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")
# Reference heuristic: speech is at most ~6.5 tokens a second; more is a loop.
TOKENS_PER_SECOND = 6.5
_BOS, _EOS = 1, 2
_WORD_MARK = "\u2581"  # SentencePiece's word-start marker
_MIN_SAMPLES = SAMPLE_RATE // 10  # the encoder's convolutions need ~0.1 s


class ModelNotFoundError(FatalSpeechError):
    """The Moonshine model files are not installed where they were looked for."""


def find_model_dir() -> Path:
    """``moonshine_cpp/models/base-en`` of the installed wheel, without importing it."""
    spec = importlib.util.find_spec("moonshine_cpp")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / "models" / "base-en"
        if all((candidate / name).is_file() for name in MODEL_FILES):
            return candidate
    raise ModelNotFoundError(
        f"Moonshine base-en model files {', '.join(MODEL_FILES)} not found: install the "
        f"'{MODEL_PACKAGE}' package (pip install {MODEL_PACKAGE}==0.1.4, or callstream[offline]); "
        f"searched {locations or 'nowhere: the package is not installed'}"
    )


def check_model_dir(model_dir: Path) -> Path:
    """`model_dir` if it holds every model file, else a ModelNotFoundError naming them."""
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelNotFoundError(
            f"Moonshine model directory {model_dir} lacks {', '.join(missing)}; the files ship "
            f"in the '{MODEL_PACKAGE}' package (pip install {MODEL_PACKAGE}==0.1.4)"
        )
    return model_dir


class Tokenizer:
    """Moonshine's ``tokenizer.bin``: token i is the i-th length-prefixed byte string.

    Ids 0-2 are <unk>, <s>, </s>; the next 256 are single bytes (byte fallback);
    the rest are SentencePiece pieces in UTF-8, where U+2581 starts a word.
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        """Parse the file: a one-byte length, then that many bytes, repeated."""
        data = path.read_bytes()
        pieces: list[bytes] = []
        pos = 0
        while pos < len(data):
            size = data[pos]
            if pos + 1 + size > len(data):
                raise ModelNotFoundError(f"{path} is truncated at byte {pos}: not a tokenizer.bin")
            pieces.append(data[pos + 1 : pos + 1 + size])
            pos += 1 + size
        return cls(pieces)

    def decode(self, ids: list[int]) -> str:
        """Text of the token ids; special and out-of-vocabulary ids are skipped."""
        raw = b"".join(self.pieces[i] for i in ids if _EOS < i < len(self.pieces))
        return raw.decode("utf-8", errors="replace").replace(_WORD_MARK, " ").strip()


@dataclass(frozen=True)
class _DecoderSignature:
    """Names of the merged decoder's inputs and outputs, read from its metadata."""

    cache_inputs: tuple[str, ...]  # past_key_values.{layer}.{decoder|encoder}.{key|value}
    cache_outputs: tuple[str, ...]  # present.*, in the same order
    cache_shape: tuple[int, int]  # (heads, head size)

    @classmethod
    def read(cls, session: ort.InferenceSession) -> _DecoderSignature:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        cache_in = tuple(n for n in inputs if n.startswith("past_key_values."))
        cache_out = tuple("present." + n.removeprefix("past_key_values.") for n in cache_in)
        expected = {"input_ids", "encoder_hidden_states", "use_cache_branch"}
        if not expected <= inputs.keys() or not set(cache_out) <= set(outputs) or not cache_in:
            raise ModelNotFoundError(f"unexpected Moonshine decoder signature: {sorted(inputs)}")
        shape = inputs[cache_in[0]].shape
        return cls(cache_in, cache_out, (int(shape[1]), int(shape[3])))


class MoonshineModel:
    """Encoder + merged decoder sessions and the tokenizer; thread-safe to share."""

    def __init__(self, model_dir: Path | None = None, threads: int = 1) -> None:
        model_dir = check_model_dir(model_dir) if model_dir else find_model_dir()
        self.tokenizer = Tokenizer.from_file(model_dir / "tokenizer.bin")
        self.encoder = _load_session(model_dir / "encoder_model.ort", threads)
        self.decoder = _load_session(model_dir / "decoder_model_merged.ort", threads)
        self._audio_input = self.encoder.get_inputs()[0].name
        self._signature = _DecoderSignature.read(self.decoder)
        self._output_names = ["logits", *self._signature.cache_outputs]
        log.info("loaded Moonshine base-en from %s (%d threads)", model_dir, threads)

    def transcribe(self, audio: np.ndarray, draft: Sequence[int] = ()) -> Transcript:
        """Greedy transcript of 16 kHz float audio (one utterance, up to ~30 s).

        `draft`, token ids of an earlier guess (the previous partial of a
        growing utterance), saves work without changing the result: it is
        checked in one decoder pass and only its prefix that greedy decoding
        would itself have produced is kept.
        """
        if len(audio) < _MIN_SAMPLES:
            audio = np.pad(audio, (0, _MIN_SAMPLES - len(audio)))
        batch = np.ascontiguousarray(audio, dtype=np.float32)[np.newaxis, :]
        hidden = self.encoder.run(None, {self._audio_input: batch})[0]
        ids = self._greedy(hidden, token_budget(len(audio)), list(draft))
        return Transcript(self.tokenizer.decode(ids), tuple(ids))

    def _greedy(self, hidden: np.ndarray, limit: int, draft: list[int]) -> list[int]:
        sig = self._signature
        empty = np.zeros((1, sig.cache_shape[0], 0, sig.cache_shape[1]), np.float32)
        feeds: dict[str, np.ndarray] = {name: empty for name in sig.cache_inputs}
        feeds["encoder_hidden_states"] = hidden
        # First pass (no-cache branch): <s> and the draft together. It also
        # returns the cross-attention cache, computed once from the audio.
        draft = draft[: limit - 1]
        feeds["input_ids"] = np.array([[_BOS, *draft]], np.int64)
        feeds["use_cache_branch"] = np.array([False])
        logits, *present = self.decoder.run(self._output_names, feeds)
        predicted = np.argmax(logits[0], axis=-1)
        ids: list[int] = []
        for guess, greedy in zip(draft, predicted, strict=False):
            if guess != greedy:
                break
            ids.append(guess)
        kept = len(ids) + 1  # <s> and the accepted draft; later positions are dropped
        for name, value in zip(sig.cache_inputs, present, strict=True):
            feeds[name] = value[:, :, :kept] if ".decoder." in name else value
        token = int(predicted[len(ids)])
        feeds["use_cache_branch"] = np.array([True])
        while token != _EOS and len(ids) < limit:
            ids.append(token)
            feeds["input_ids"] = np.array([[token]], np.int64)
            logits, *present = self.decoder.run(self._output_names, feeds)
            token = int(np.argmax(logits[0, -1]))
            # The cache branch returns placeholders for the cross-attention
            # cache: only the self-attention cache is fed back.
            for name, value in zip(sig.cache_inputs, present, strict=True):
                if ".decoder." in name:
                    feeds[name] = value
        return ids


@dataclass(frozen=True)
class Transcript:
    """Decoded text and the token ids it came from."""

    text: str
    tokens: tuple[int, ...]


def token_budget(samples: int) -> int:
    """Most tokens worth generating for this much 16 kHz audio."""
    return max(4, int(np.ceil(samples / SAMPLE_RATE * TOKENS_PER_SECOND)))


def _load_session(path: Path, threads: int) -> ort.InferenceSession:
    """An onnxruntime session for a Moonshine ``.ort`` file with its weights pre-dequantised."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Pre-packed weight copies would double the decoder's memory for no
    # measurable speed-up on single-row (one token) matrix products.
    options.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="callstream-moonshine-") as tmp:
        resaved = Path(tmp) / "resaved.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        convert = ort.SessionOptions()
        convert.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        convert.optimized_model_filepath = str(resaved)
        ort.InferenceSession(str(path), convert, providers=["CPUExecutionProvider"])
        with prepared.open("wb") as out:
            prepare_model(resaved.read_bytes(), out)
        resaved.unlink()
        return ort.InferenceSession(str(prepared), options, providers=["CPUExecutionProvider"])
