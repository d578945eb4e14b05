"""One map from a stream's positions to a source's own positions. Pure.

A recognition stream carries a source's audio in runs, with filler between
them that is not the source's (keep-alive silence, padding of a stereo
channel). `RunMap` records each run as (stream start, own start, length),
in any unit, and finds the run a stream position falls in. The two clocks
built on it differ only in what a position outside every run means:
`services/transcriber/recovery.StreamClock` (stream ms to call ms; filler maps
to nothing) and `callstream/asr/transcribe/mux.ChannelClock` (stereo samples to
one handle's ms; padding maps to the handle time at which it was inserted).
"""

from __future__ import annotations

import bisect

Run = tuple[int, int, int]  # (stream start, own start, length)


class RunMap:
    """Runs of a source's positions in a stream, in stream order."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._runs: list[Run] = []

    def add(self, stream_at: int, own_at: int, length: int) -> None:
        """`length` units of the source, from its own `own_at`, sit in the stream from
        `stream_at`; a run that continues the last one in both extends it."""
        if self._runs:
            s0, o0, n = self._runs[-1]
            if s0 + n == stream_at and o0 + n == own_at:
                self._runs[-1] = (s0, o0, n + length)
                return
        self._runs.append((stream_at, own_at, length))
        self._starts.append(stream_at)

    def index(self, stream_at: int) -> int:
        """Index of the last run that starts at or before `stream_at`; -1 if none."""
        return bisect.bisect_right(self._starts, stream_at) - 1

    def __getitem__(self, i: int) -> Run:
        return self._runs[i]

    def __len__(self) -> int:
        return len(self._runs)

    def forget_before(self, stream_at: int) -> None:
        """Drop the runs that end before `stream_at`, always keeping the last."""
        keep = 0
        while keep < len(self._runs) - 1:
            s0, _, n = self._runs[keep]
            if s0 + n >= stream_at:
                break
            keep += 1
        if keep:
            del self._runs[:keep]
            del self._starts[:keep]
