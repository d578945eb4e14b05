"""Element framing: where an element may appear, where it ends, and how it is cut off.

The rules the reader checks every element header against (allowed parents,
which IDs close an open unknown-size element, sizes that overrun their
parent), the header of a child inside a wholly buffered master, and the
`StreamError` for input that ends inside an element.
"""

from __future__ import annotations

from typing import NamedTuple

from callstream.mkv.ebml import (
    CLUSTER,
    CLUSTER_CHILDREN,
    CRC32,
    ID_LENGTH,
    SEGMENT,
    SEGMENT_CHILDREN,
    TOP_LEVEL,
    VINT_LENGTH,
    VINT_MASK,
    VOID,
    InvalidEbml,
    NeedMoreData,
    element_name,
    read_id,
    read_size,
)
from callstream.mkv.reports import StreamError

NO_END = -1
# Where each element may appear; other IDs there mean corruption. Unknown-size
# elements give no other way to notice it.
ALLOWED_CHILDREN: dict[int | None, frozenset[int]] = {
    None: TOP_LEVEL | {VOID, CRC32},
    SEGMENT: SEGMENT_CHILDREN,
    CLUSTER: CLUSTER_CHILDREN,
}
# IDs that close an open unknown-size element because they belong to a parent level.
CLOSES_UNKNOWN: dict[int, frozenset[int]] = {
    CLUSTER: SEGMENT_CHILDREN | TOP_LEVEL,
    SEGMENT: TOP_LEVEL,
}


class Corrupt(Exception):
    """Raised inside the reader when the bytes at `offset` cannot be what they claim."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


class OpenElement(NamedTuple):
    """A master element being read: ID, absolute end (or NO_END), start, parent limit."""

    element_id: int
    end: int
    start: int
    limit: int


def check_placement(parent_id: int | None, eid: int, start: int) -> None:
    """Raise `Corrupt` unless `eid` may appear inside `parent_id` (None: the top level)."""
    allowed = ALLOWED_CHILDREN.get(parent_id)
    if allowed is not None and eid not in allowed:
        where = element_name(parent_id) if parent_id is not None else "the top level"
        raise Corrupt(start, f"{element_name(eid)} at offset {start} cannot be in {where}")


def check_size(eid: int, start: int, size: int, end: int, parent: OpenElement | None) -> None:
    """Raise `Corrupt` if an unknown size is not allowed here or `end` overruns the parent."""
    if end == NO_END:
        if eid not in CLOSES_UNKNOWN:
            raise Corrupt(start, f"{element_name(eid)} at offset {start} has an unknown size")
        return
    limit = parent.limit if parent else NO_END
    if limit != NO_END and end > limit:
        raise Corrupt(
            start,
            f"{element_name(eid)} at offset {start} ({size} bytes) "
            f"overruns its parent's end {limit}",
        )


def child_header(view: bytes | memoryview, pos: int, b: int, base: int) -> tuple[int, int, int]:
    """Header of the child at `pos` of a wholly buffered master ending at `b`.

    `view` ends where the buffered element ends, so a header cut by that end is
    reported the same way whatever was fed after it. Decoded inline (same rules
    as `read_element_header`): tags are the most numerous elements after blocks.
    """
    try:
        first = view[pos]
        id_length = ID_LENGTH[first]
        p = pos + id_length
        size_length = VINT_LENGTH[view[p]]
    except IndexError:
        start = base + pos
        raise Corrupt(start, f"element header at offset {start} overruns its parent") from None
    q = p + size_length
    if not id_length or not size_length or q > len(view):
        start = base + pos
        if id_length and size_length:
            raise Corrupt(start, f"element header at offset {start} overruns its parent")
        raise Corrupt(start, f"invalid element header at offset {start}")
    mask = VINT_MASK[size_length]
    size = int.from_bytes(view[p:q], "big") & mask
    eid = first if id_length == 1 else int.from_bytes(view[pos:p], "big")
    if size == mask or q + size > b:
        start = base + pos
        raise Corrupt(start, f"{element_name(eid)} at offset {start} overruns its parent")
    return eid, size, q - pos


def cut_skipped(skip_id: int, skip_start: int, missing: int) -> StreamError:
    """Input ended inside an element being skipped, `missing` bytes short."""
    name = element_name(skip_id)
    return StreamError(
        skip_start, f"input ended inside {name} at offset {skip_start}: {missing} bytes missing"
    )


def cut_element(buf: bytearray, pos: int, here: int) -> StreamError:
    """Input ended inside the element whose first bytes are buf[pos:] (absolute `here`)."""
    try:
        eid, id_len = read_id(buf, pos)
        size, size_len = read_size(buf, pos + id_len)
    except (NeedMoreData, InvalidEbml):
        have = len(buf) - pos
        return StreamError(
            here, f"input ended inside an element header at offset {here} ({have} bytes)"
        )
    missing = size - (len(buf) - pos - id_len - size_len)
    return StreamError(
        here,
        f"input ended inside {element_name(eid)} at offset {here}: "
        f"{missing} of its {size} bytes missing",
    )


def cut_master(stack: list[OpenElement], here: int) -> StreamError | None:
    """Input ended at `here` inside the innermost open master of known size, if any."""
    for opened in reversed(stack):
        if opened.end != NO_END:
            name, start = element_name(opened.element_id), opened.start
            missing = opened.end - here
            return StreamError(
                start, f"input ended inside {name} at offset {start}: {missing} bytes missing"
            )
    return None
