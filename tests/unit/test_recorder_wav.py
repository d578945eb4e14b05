"""`services/recorder/wav.py`: the header, interleaving and the CRC32 of concatenations."""

from __future__ import annotations

import io
import wave
import zlib

from hypothesis import given
from hypothesis import strategies as st

from services.recorder.wav import checksum_b64, crc32_combine, interleave, wav_header


@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_crc32_combine_is_the_crc32_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_the_header_reads_back_with_the_standard_wave_module() -> None:
    pcm = bytes(range(256)) * 8
    for channels in (1, 2):
        with wave.open(io.BytesIO(wav_header(len(pcm), channels=channels) + pcm)) as wav:
            assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (
                channels,
                2,
                8000,
            )
            assert wav.readframes(wav.getnframes()) == pcm


def test_interleave_puts_left_then_right_sample_by_sample() -> None:
    left, right = b"\x01\x00\x02\x00", b"\x0a\x00\x0b\x00"
    assert interleave([left, right]) == b"\x01\x00\x0a\x00\x02\x00\x0b\x00"
    assert interleave([left]) == left


def test_the_checksum_is_base64_of_the_big_endian_crc() -> None:
    assert checksum_b64(0x12345678) == "EjRWeA=="
