"""Resynchronisation: after corrupt input, find the next EBML header that verifies.

The magic alone is not enough (PCM can contain 1A 45 DF A3), so a candidate
is accepted only when a whole, well-formed EBML header starts there.
"""

from __future__ import annotations

from callstream.mkv.ebml import (
    EBML_VERSION,
    UNKNOWN_SIZE,
    InvalidEbml,
    NeedMoreData,
    read_id,
    read_size,
)

EBML_MAGIC = b"\x1a\x45\xdf\xa3"


def verified_header_at(buf: bytearray, index: int) -> bool | None:
    """Whether a strict EBML header starts at `index` (None: need more bytes to tell).

    A real header has a known size and starts with an EBMLVersion element of
    1..8 bytes.
    """
    try:
        size, size_len = read_size(buf, index + 4)
        if size == UNKNOWN_SIZE:
            return False
        child_at = index + 4 + size_len
        child, child_len = read_id(buf, child_at)
        if child != EBML_VERSION:
            return False
        child_size, _ = read_size(buf, child_at + child_len)
    except NeedMoreData:
        return None
    except InvalidEbml:
        return False
    return 0 < child_size <= 8 and child_size < size


def next_header(buf: bytearray, pos: int) -> tuple[int, bool]:
    """(where to go on from, found) for the first verified header at or after `pos`.

    When none is found yet, the position returned is where the search must
    resume once more bytes arrive: a candidate still undecided, or the last
    bytes that could begin the magic.
    """
    while True:
        index = buf.find(EBML_MAGIC, pos)
        if index < 0:
            return max(pos, len(buf) - len(EBML_MAGIC) + 1), False
        verdict = verified_header_at(buf, index)
        if verdict is None:
            return index, False
        if verdict:
            return index, True
        pos = index + 1
