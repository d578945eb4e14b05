"""What the streaming Matroska reader reports: one frozen event per fact found.

Offsets are absolute byte offsets in the stream fed to the reader (the first
byte ever fed is offset 0). Timecodes are in milliseconds, already scaled by the
segment's TimecodeScale; Amazon Connect writes absolute epoch milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class TrackInfo:
    """One TrackEntry; `sampling_frequency` and `channels` come from its Audio element."""

    number: int
    uid: int
    name: str | None
    codec_id: str | None
    track_type: int | None
    sampling_frequency: float | None = None
    channels: int | None = None


@dataclass(frozen=True, slots=True)
class SegmentStarted:
    """A Segment began; `offset` is where its fragment starts (its EBML header, if any)."""

    offset: int


@dataclass(frozen=True, slots=True)
class TracksRead:
    """A complete Tracks element; frames after it carry these track names."""

    tracks: tuple[TrackInfo, ...]


@dataclass(frozen=True, slots=True)
class TagsRead:
    """One top-level Tags element: every SimpleTag (nested ones too) as (name, value), in order."""

    tags: tuple[tuple[str, str], ...]
    offset: int


@dataclass(frozen=True, slots=True)
class ClusterStarted:
    """A Cluster's Timecode was read; `offset` is the Cluster element's start."""

    timecode_ms: int
    offset: int


@dataclass(frozen=True, slots=True)
class FrameRead:
    """One media frame, reported as soon as its block is complete."""

    track_number: int
    track_name: str | None
    timecode_ms: int
    keyframe: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class ClusterEnded:
    """A Cluster ended; `offset` is the first byte after it."""

    offset: int


@dataclass(frozen=True, slots=True)
class StreamError:
    """Corrupt or truncated input at `offset`; the reader resynchronises after it."""

    offset: int
    reason: str


MkvEvent = (
    SegmentStarted | TracksRead | TagsRead | ClusterStarted | FrameRead | ClusterEnded | StreamError
)


def slot_setters(cls: type) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of a frozen slots dataclass, in field order.

    Filling the slots directly makes the same object as cls(...), whose frozen
    __init__ goes through object.__setattr__ per field: for the events made per
    block or per tag, that costs more than the decoding itself.
    """
    return tuple(getattr(cls, f.name).__set__ for f in fields(cls))
