"""Recorder core: a call's audio events in, spool writes and WAV uploads out.

Pure. `CallRecording.accept(event)` returns `SpoolWrite` effects (put PCM at
its byte offset in the track's spool file; the same chunk twice writes the
same bytes); `uploads()` returns one `UploadWav` per track once the call has
ended and every chunk its CallEnded counted has arrived, until the adapter
calls `mark_uploaded()`. Placing
chunks by offset makes out-of-order and replayed records harmless.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime

from callstream.events import AudioChunkCaptured, CallEnded, Event, Track

SAMPLE_RATE = 8000


@dataclass(frozen=True)
class SpoolWrite:
    """Write `pcm` at `byte_offset` of the track's spool."""

    contact_id: str
    track: Track
    byte_offset: int
    pcm: bytes


@dataclass(frozen=True)
class UploadWav:
    """Upload the track's spool as a WAV of `pcm_bytes` bytes under `key`."""

    contact_id: str
    track: Track
    key: str
    pcm_bytes: int


@dataclass
class _TrackProgress:
    sequences: set[int] = field(default_factory=set)
    end_byte: int = 0
    first_start_time_ms: int | None = None  # absolute time of sample 0, from chunk 0


class CallRecording:
    """One call's recording state machine."""

    def __init__(self, contact_id: str, key_prefix: str) -> None:
        self.contact_id = contact_id
        self.key_prefix = key_prefix
        self.tracks: dict[Track, _TrackProgress] = {}
        self.ended: CallEnded | None = None
        self.uploaded = False

    def accept(self, event: Event) -> list[SpoolWrite]:
        """Take one event of this call; return the spool writes it needs."""
        if isinstance(event, AudioChunkCaptured):
            return self._chunk(event)
        if isinstance(event, CallEnded):
            self.ended = event
        return []

    def mark_uploaded(self) -> None:
        """The adapter stored every WAV: the call is durable."""
        self.uploaded = True

    @property
    def complete(self) -> bool:
        """Ended, and every counted chunk of every track has arrived."""
        if self.ended is None:
            return False
        for name, count in self.ended.chunk_counts.items():
            progress = self.tracks.get(Track(name))
            have = len(progress.sequences) if progress else 0
            if have < count:
                return False
        return True

    def _chunk(self, chunk: AudioChunkCaptured) -> list[SpoolWrite]:
        progress = self.tracks.setdefault(chunk.track, _TrackProgress())
        if chunk.sequence in progress.sequences:
            return []
        progress.sequences.add(chunk.sequence)
        # Gaps in the KVS stream (lost fragments) stay silent: wall-clock placement.
        offset = (chunk.sample_offset + chunk.gap_total_ms * 8) * 2
        progress.end_byte = max(progress.end_byte, offset + len(chunk.pcm))
        if chunk.sample_offset == 0:
            progress.first_start_time_ms = chunk.start_time_ms
        return [SpoolWrite(self.contact_id, chunk.track, offset, chunk.pcm)]

    def uploads(self) -> list[UploadWav]:
        """The WAVs to store, once the call is complete and until they are stored."""
        if self.uploaded or not self.complete:
            return []
        start = self._call_start_ms()
        return [
            UploadWav(self.contact_id, track, self.key_for(track, start), progress.end_byte)
            for track, progress in sorted(self.tracks.items(), key=lambda kv: kv[0].value)
        ]

    def stored_keys(self) -> list[str]:
        """After CallEnded: the keys its WAVs have once stored (empty if they can't be known).

        A replay that starts mid-call (its first records were checkpointed as
        done) ends without every chunk; if these objects exist, the call was
        recorded and the replay is skipped.
        """
        if self.ended is None or self.ended.call_start_time_ms is None:
            return []
        start = self.ended.call_start_time_ms
        tracks = sorted(Track(name) for name, n in self.ended.chunk_counts.items() if n > 0)
        return [self.key_for(track, start) for track in tracks]

    def _call_start_ms(self) -> int:
        if self.ended is not None and self.ended.call_start_time_ms is not None:
            return self.ended.call_start_time_ms
        starts = [p.first_start_time_ms for p in self.tracks.values() if p.first_start_time_ms]
        return min(starts) if starts else 0

    def key_for(self, track: Track, start_ms: int) -> str:
        """`<prefix><ContactId>_<ISO-8601 start>_<TRACK>.wav`: the same on every replay."""
        stamp = datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        stamp += f".{start_ms % 1000:03d}Z"
        return f"{self.key_prefix}{self.contact_id}_{stamp}_{track.value}.wav"


def wav_header(pcm_bytes: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte RIFF/WAVE header of 16-bit mono PCM."""
    return (
        b"RIFF"
        + struct.pack("<I", 36 + pcm_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", pcm_bytes)
    )
