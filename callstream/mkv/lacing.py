"""Lacing: where each frame of a laced block lies (Xiph, EBML or fixed-size lacing)."""

from __future__ import annotations

from callstream.mkv.ebml import InvalidEbml, NeedMoreData, read_size
from callstream.mkv.framing import Corrupt

LACING_MASK = 0x06
XIPH_LACING = 0x02
FIXED_LACING = 0x04  # and 0x06: EBML lacing


def lace_ranges(buf: bytearray, start: int, lacing: int, p: int, end: int) -> list[tuple[int, int]]:
    """Buffer ranges of the frames of a laced block whose lace header is at buf[p]."""
    if p >= end:
        raise Corrupt(start, f"laced block at offset {start} has no frame count")
    count = buf[p] + 1
    p += 1
    try:
        if lacing == FIXED_LACING:
            if (end - p) % count:
                raise Corrupt(start, f"fixed-laced block at offset {start} does not divide")
            sizes = [(end - p) // count] * (count - 1)
        elif lacing == XIPH_LACING:
            sizes, p = _xiph_sizes(buf, p, end, count)
        else:
            sizes, p = _ebml_lace_sizes(buf, p, count)
    except (NeedMoreData, InvalidEbml):
        raise Corrupt(start, f"invalid lace sizes in block at offset {start}") from None
    sizes.append(end - p - sum(sizes))
    if p > end or min(sizes) < 0:
        raise Corrupt(start, f"lace sizes of block at offset {start} overrun the block")
    ranges = []
    for size in sizes:
        ranges.append((p, p + size))
        p += size
    return ranges


def _xiph_sizes(buf: bytearray, p: int, end: int, count: int) -> tuple[list[int], int]:
    sizes = []
    for _ in range(count - 1):
        size = 0
        while p < end:
            byte = buf[p]
            p += 1
            size += byte
            if byte != 0xFF:
                break
        sizes.append(size)
    return sizes, p


def _ebml_lace_sizes(buf: bytearray, p: int, count: int) -> tuple[list[int], int]:
    if count == 1:
        return [], p
    first, length = read_size(buf, p)
    p += length
    sizes = [first]
    for _ in range(count - 2):
        raw, length = read_size(buf, p)
        p += length
        # Later sizes are differences, stored with a bias to make them unsigned.
        sizes.append(sizes[-1] + raw - ((1 << (7 * length - 1)) - 1))
    return sizes, p
