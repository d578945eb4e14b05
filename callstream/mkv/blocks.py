"""Blocks to frames: a SimpleBlock or BlockGroup Block, complete in the buffer, as `FrameRead`s.

`scan_blocks` is the short path for nearly every byte of a KVS stream (runs
of unlaced SimpleBlocks with one-byte track numbers); `emit_block` reads any
block, laced or not. Both give the same events for the same block.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from callstream.mkv.ebml import InvalidEbml, NeedMoreData, read_size
from callstream.mkv.framing import Corrupt
from callstream.mkv.lacing import LACING_MASK, lace_ranges
from callstream.mkv.reports import FrameRead, MkvEvent, slot_setters

_FRAME_SETTERS = slot_setters(FrameRead)
# A SimpleBlock's element header and block header, as KVS writes them: ID A3,
# 8-byte size, 1-byte track number, signed 16-bit timecode, flags.
_KVS_BLOCK = struct.Struct(">BQBhB").unpack_from
_SHORT_BLOCK = struct.Struct(">BBBhB").unpack_from
_MEDIUM_BLOCK = struct.Struct(">BHBhB").unpack_from
_BLOCK_HEAD_MAX = 13
_SIZE_8 = (1 << 56) - 1


def _other_block_head(buf: bytearray, pos: int) -> tuple[int, int, int, int, int] | None:
    """(size, body index, track byte, timecode, flags) for a 1- or 2-byte size; else None."""
    first = buf[pos + 1]
    if 0x80 <= first < 0xFF:
        _, size, track, relative, flags = _SHORT_BLOCK(buf, pos)
        return size & 0x7F, pos + 2, track, relative, flags
    if 0x40 <= first < 0x80:
        _, size, track, relative, flags = _MEDIUM_BLOCK(buf, pos)
        size &= 0x3FFF
        return None if size == 0x3FFF else (size, pos + 3, track, relative, flags)
    return None


def _frame_factory() -> Callable[[int, str | None, int, bool, bytes], FrameRead]:
    """A FrameRead constructor that fills the slots directly (see `slot_setters`)."""
    new = object.__new__
    set_track, set_name, set_time, set_key, set_data = _FRAME_SETTERS

    def make(track: int, name: str | None, timecode_ms: int, key: bool, data: bytes) -> FrameRead:
        frame = new(FrameRead)
        set_track(frame, track)
        set_name(frame, name)
        set_time(frame, timecode_ms)
        set_key(frame, key)
        set_data(frame, data)
        return frame

    return make


_new_frame = _frame_factory()


def scan_blocks(
    buf: bytearray,
    pos: int,
    bound: int,
    tc: int,
    scale: int,
    max_size: int,
    names: dict[int, str | None],
    append: Callable[[MkvEvent], None],
) -> int:
    """Emit a run of complete, unlaced SimpleBlocks from buf[pos:bound]; return where it stopped.

    It stops at anything else (laced, odd-sized, incomplete, or past `bound`,
    the Cluster's end), which the general path then reads or reports.
    """
    stop, new = len(buf) - _BLOCK_HEAD_MAX, object.__new__
    set_track, set_name, set_time, set_key, set_data = _FRAME_SETTERS
    while pos <= stop and pos < bound and buf[pos] == 0xA3:
        if buf[pos + 1] == 0x01:  # the 8-byte size KVS writes
            _, size, track, relative, flags = _KVS_BLOCK(buf, pos)
            size &= _SIZE_8
            body = pos + 9
        else:
            head = _other_block_head(buf, pos)
            if head is None:
                break
            size, body, track, relative, flags = head
        end = body + size
        if end > bound or not 4 <= size <= max_size or not track & 0x80 or flags & LACING_MASK:
            break
        track &= 0x7F
        frame = new(FrameRead)
        set_track(frame, track)
        set_name(frame, names.get(track))
        set_time(
            frame, tc + relative if scale == 1_000_000 else (tc + relative) * scale // 1_000_000
        )
        set_key(frame, flags & 0x80 != 0)
        set_data(frame, bytes(buf[body + 4 : end]))
        append(frame)
        pos = end
    return pos


def emit_block(
    buf: bytearray,
    start: int,
    a: int,
    b: int,
    keyframe: bool | None,
    cluster_tc: int | None,
    scale: int,
    names: dict[int, str | None],
    append: Callable[[MkvEvent], None],
) -> None:
    """Emit the frames of the block whose body is buf[a:b] (its element starts at `start`).

    `keyframe` None means a SimpleBlock, whose flags say; a BlockGroup's Block
    has no keyframe flag, so its group decides.
    """
    first = buf[a]
    if first & 0x80:
        track, p = first & 0x7F, a + 1
    else:
        track, p = _long_track_number(buf, start, a)
    if p + 3 > b:
        raise Corrupt(start, f"block at offset {start} is shorter than its header")
    if cluster_tc is None:
        raise Corrupt(start, f"block at offset {start} comes before its Cluster's Timecode")
    relative = (buf[p] << 8) | buf[p + 1]
    if relative & 0x8000:
        relative -= 0x10000
    flags = buf[p + 2]
    key = bool(flags & 0x80) if keyframe is None else keyframe
    timecode_ms = (cluster_tc + relative) * scale // 1_000_000
    name = names.get(track)
    lacing = flags & LACING_MASK
    if not lacing:
        append(_new_frame(track, name, timecode_ms, key, bytes(buf[p + 3 : b])))
        return
    for x, y in lace_ranges(buf, start, lacing, p + 3, b):
        append(_new_frame(track, name, timecode_ms, key, bytes(buf[x:y])))


def _long_track_number(buf: bytearray, start: int, a: int) -> tuple[int, int]:
    try:
        track, length = read_size(buf, a)
    except (NeedMoreData, InvalidEbml):
        raise Corrupt(start, f"invalid track number in block at offset {start}") from None
    return track, a + length
