"""On-disk spool of a call's tracks: PCM placed at its offset, WAV header in front.

Each track is one file `<spool>/<contact>/<TRACK>.wav` whose first 44 bytes
are reserved for the header, so finishing a recording is writing the header
and uploading the file: long calls and many calls never sit in memory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from callstream.events import Track
from services.recorder.core import wav_header

HEADER_BYTES = 44


class Spool:
    """Spool files under one directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, contact_id: str, track: Track) -> Path:
        """The spool file of one track."""
        return self.root / contact_id / f"{track.value}.wav"

    def write(self, contact_id: str, track: Track, byte_offset: int, pcm: bytes) -> None:
        """Write PCM at its offset (idempotent: the same chunk writes the same bytes)."""
        path = self.path(contact_id, track)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if path.exists() else "w+b"
        with path.open(mode) as f:
            f.seek(HEADER_BYTES + byte_offset)
            f.write(pcm)

    def finish(self, contact_id: str, track: Track, pcm_bytes: int) -> Path:
        """Write the WAV header for `pcm_bytes` of PCM (gaps read as silence); return the file."""
        path = self.path(contact_id, track)
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if path.exists() else "w+b"
        with path.open(mode) as f:
            f.seek(0)
            f.write(wav_header(pcm_bytes))
            f.truncate(HEADER_BYTES + pcm_bytes)
        return path

    def discard(self, contact_id: str) -> None:
        """Remove a call's spool once its WAVs are stored."""
        shutil.rmtree(self.root / contact_id, ignore_errors=True)
