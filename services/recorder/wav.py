"""WAV bytes and their S3 checksum, for the recorder. Pure.

The 44-byte RIFF/WAVE header, interleaving tracks into frames, and the CRC32
S3 checks: `crc32_combine` builds a whole object's CRC32 from its parts', as
part 1 (the header and the first PCM) is uploaded last.
"""

from __future__ import annotations

import base64
import struct

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE


def wav_header(pcm_bytes: int, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """The 44-byte RIFF/WAVE header of 16-bit PCM."""
    block = channels * BYTES_PER_SAMPLE
    return (
        b"RIFF"
        + struct.pack("<I", 36 + pcm_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", pcm_bytes)
    )


def interleave(channels: list[bytes]) -> bytes:
    """16-bit samples of equal-length channels, frame by frame (left, right, left...)."""
    if len(channels) == 1:
        return channels[0]
    n = len(channels)
    out = bytearray(len(channels[0]) * n)
    step = BYTES_PER_SAMPLE * n
    for i, pcm in enumerate(channels):
        out[i * 2 :: step] = pcm[0::2]
        out[i * 2 + 1 :: step] = pcm[1::2]
    return bytes(out)


def checksum_b64(crc: int) -> str:
    """A CRC32 as S3 shows it (x-amz-checksum-crc32): base64 of its 4 big-endian bytes."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32 of A+B from CRC32(A), CRC32(B) and len(B): zlib's crc32_combine.

    Part 1 (header and the first PCM) is uploaded last, so the whole object's
    checksum is built from the parts' as they go."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2
