"""On-disk spool of a call's tracks: PCM placed at its offset, in segment files.

Each track's PCM, in its own timeline, lives in files of `segment_bytes`
(`<spool>/<contact>/<TRACK>.<n>.pcm`). A chunk is written at its byte offset,
so order and replays do not matter; a read returns silence where nothing was
written. Once a recording's part is uploaded, the segments below what every
recording still needs are deleted (`discard_below`), so a call's disk use is
about one part per recording however long the call, and writes below that
floor (a re-read chunk already stored) are dropped.

Writes of consecutive chunks are gathered in memory (`buffer_bytes` per
track, 64 KiB: 4 s) and written together, so the loop's thread makes a few
system calls per second of audio, not three per chunk (each one gives other
threads the interpreter). `flush` writes them out; a reader calls it first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from callstream.events import Track

SEGMENT_BYTES = 256 * 1024  # 16 s of one track
BUFFER_BYTES = 64 * 1024  # 4 s of one track


class Spool:
    """Spool files under one directory."""

    def __init__(
        self,
        root: str | Path,
        segment_bytes: int = SEGMENT_BYTES,
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        self.root = Path(root)
        self.segment_bytes = segment_bytes
        self.buffer_bytes = buffer_bytes
        self._floors: dict[tuple[str, Track], int] = {}  # bytes below are gone
        self._made: dict[str, str] = {}  # calls whose directory exists
        self._pending: dict[tuple[str, Track], tuple[int, bytearray]] = {}  # offset, bytes
        self._fds: dict[tuple[str, Track], tuple[int, int]] = {}  # segment written last, its fd

    def _path(self, contact_id: str, track: Track, segment: int) -> Path:
        return self.root / contact_id / f"{track.value}.{segment}.pcm"

    def write(self, contact_id: str, track: Track, byte_offset: int, pcm: bytes) -> None:
        """Write PCM at its offset (idempotent: the same chunk writes the same bytes);
        a chunk that follows the last one waits in memory with it."""
        key = (contact_id, track)
        pending = self._pending.get(key)
        if pending is not None and pending[0] + len(pending[1]) == byte_offset:
            pending[1].extend(pcm)
        else:
            self._write_pending(key)
            self._pending[key] = (byte_offset, bytearray(pcm))
        if len(self._pending[key][1]) >= self.buffer_bytes:
            self._write_pending(key)

    def flush(self, contact_id: str) -> None:
        """Write out what waits in memory for the call (before its spool is read)."""
        for key in [k for k in self._pending if k[0] == contact_id]:
            self._write_pending(key)

    def _write_pending(self, key: tuple[str, Track]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            self._write(key[0], key[1], pending[0], bytes(pending[1]))

    def _write(self, contact_id: str, track: Track, byte_offset: int, pcm: bytes) -> None:
        floor = self._floors.get((contact_id, track), 0)
        if byte_offset < floor:
            pcm, byte_offset = pcm[floor - byte_offset :], floor
        while pcm:
            segment, within = divmod(byte_offset, self.segment_bytes)
            piece = pcm[: self.segment_bytes - within]
            os.pwrite(self._fd(contact_id, track, segment), piece, within)
            pcm, byte_offset = pcm[len(piece) :], byte_offset + len(piece)

    def _fd(self, contact_id: str, track: Track, segment: int) -> int:
        """The segment's file, kept open while the track writes into it."""
        key = (contact_id, track)
        held = self._fds.get(key)
        if held is not None and held[0] == segment:
            return held[1]
        self._close(key)
        name = os.path.join(self._directory(contact_id), f"{track.value}.{segment}.pcm")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600)
        self._fds[key] = (segment, fd)
        return fd

    def _close(self, key: tuple[str, Track]) -> None:
        held = self._fds.pop(key, None)
        if held is not None:
            os.close(held[1])

    def _directory(self, contact_id: str) -> str:
        """The call's directory, made on first use (a call's files: one per segment)."""
        directory = self._made.get(contact_id)
        if directory is None:
            directory = str(self.root / contact_id)
            os.makedirs(directory, exist_ok=True)
            self._made[contact_id] = directory
        return directory

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
        held = self._fds.get((contact_id, track))
        if held is not None and (held[0] + 1) * self.segment_bytes <= floor:
            self._close((contact_id, track))
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
        for key in [k for k in self._pending if k[0] == contact_id]:
            del self._pending[key]
        for key in [k for k in self._fds if k[0] == contact_id]:
            self._close(key)
        self._made.pop(contact_id, None)
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
