"""Streaming Matroska for Kinesis Video Streams: pure bytes in, events out.

`reader.MkvStreamReader` turns GetMedia/PutMedia bytes into `events`, over
`framing` (where elements may appear and end), `blocks` and `lacing` (blocks
to frames), `tracks` (track and tag semantics), `replay` (repeated metadata)
and `resync` (finding a header after corrupt input); `writer` builds Amazon
Connect's exact fragment layout; `ebml` holds the element IDs and the
variable-length-integer primitives both use.
"""

from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import (
    ClusterEnded,
    ClusterStarted,
    FrameRead,
    MkvEvent,
    SegmentStarted,
    StreamError,
    TagsRead,
    TrackInfo,
    TracksRead,
)
from callstream.mkv.writer import ConnectCallWriter, ConnectTrackLayout, write_connect_call

__all__ = [
    "ClusterEnded",
    "ClusterStarted",
    "ConnectCallWriter",
    "ConnectTrackLayout",
    "FrameRead",
    "MkvEvent",
    "MkvStreamReader",
    "SegmentStarted",
    "StreamError",
    "TagsRead",
    "TrackInfo",
    "TracksRead",
    "write_connect_call",
]
