"""On-disk spool of a call's tracks: PCM placed at its offset, in segment files.

Each track's PCM, in its own timeline, lives in files of `segment_bytes`
(`<spool>/<contact>/<TRACK>.<n>.pcm`). A chunk is written at its byte offset,
so order and replays do not matter; a read returns silence where nothing was
written. Once a recording's part is uploaded, the segments below what every
recording still needs are deleted (`discard_below`), so a call's disk use is
about one part per recording however long the call, and writes below that
floor (a re-read chunk already stored) are dropped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from callstream.events import Track

SEGMENT_BYTES = 256 * 1024  # 16 s of one track


class Spool:
    """Spool files under one directory."""

    def __init__(self, root: str | Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.root = Path(root)
        self.segment_bytes = segment_bytes
        self._floors: dict[tuple[str, Track], int] = {}  # bytes below are gone

    def _path(self, contact_id: str, track: Track, segment: int) -> Path:
        return self.root / contact_id / f"{track.value}.{segment}.pcm"

    def write(self, contact_id: str, track: Track, byte_offset: int, pcm: bytes) -> None:
        """Write PCM at its offset (idempotent: the same chunk writes the same bytes)."""
        floor = self._floors.get((contact_id, track), 0)
        if byte_offset < floor:
            pcm, byte_offset = pcm[floor - byte_offset :], floor
        while pcm:
            segment, within = divmod(byte_offset, self.segment_bytes)
            piece = pcm[: self.segment_bytes - within]
            path = self._path(contact_id, track, segment)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("r+b" if path.exists() else "w+b") as f:
                f.seek(within)
                f.write(piece)
            pcm, byte_offset = pcm[len(piece) :], byte_offset + len(piece)

    def read(self, contact_id: str, track: Track, start: int, end: int) -> bytes:
        """Bytes [start, end) of the track: silence (zeros) wherever nothing was written,
        before the track's first byte (a negative start) and after its last."""
        out = bytearray(max(end - start, 0))
        position = max(start, 0)
        while position < end:
            segment, within = divmod(position, self.segment_bytes)
            length = min(self.segment_bytes - within, end - position)
            path = self._path(contact_id, track, segment)
            if path.exists():
                with path.open("rb") as f:
                    f.seek(within)
                    data = f.read(length)
                out[position - start : position - start + len(data)] = data
            position += length
        return bytes(out)

    def discard_below(self, contact_id: str, track: Track, floor: int) -> None:
        """Delete the track's segments wholly below byte `floor`; never written again."""
        if floor <= self._floors.get((contact_id, track), 0):
            return
        self._floors[(contact_id, track)] = floor
        directory = self.root / contact_id
        if not directory.exists():
            return
        prefix = f"{track.value}."
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(".pcm"):
                segment = int(name[len(prefix) : -len(".pcm")])
                if (segment + 1) * self.segment_bytes <= floor:
                    (directory / name).unlink(missing_ok=True)

    def discard(self, contact_id: str) -> None:
        """Remove a call's spool once its recordings are stored (or given up)."""
        for key in [k for k in self._floors if k[0] == contact_id]:
            del self._floors[key]
        shutil.rmtree(self.root / contact_id, ignore_errors=True)

    def disk_bytes(self) -> int:
        """Bytes the spool holds on disk now (allocated blocks: silence costs nothing)."""
        total = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.stat(os.path.join(directory, name)).st_blocks * 512
                except FileNotFoundError:
                    continue
        return total
