"""File-mode input: a WAV or raw PCM recording, fed in pieces, out as per-channel PCM.

Pure. Accepted: WAV with 16-bit PCM at 8 kHz, mono or stereo; anything not
starting with `RIFF....WAVE` is taken as raw 8 kHz 16-bit little-endian mono
PCM. Other sample rates or widths are refused (ingest does not resample).
Channel mapping (the reference's): mono -> the customer track; stereo ->
channel 0 (left) is the customer (AUDIO_FROM_CUSTOMER), channel 1 (right)
the agent (AUDIO_TO_CUSTOMER).
"""

from __future__ import annotations

import struct
from array import array

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE
from callstream.errors import MediaStreamError

_HEADER_LIMIT = 64 * 1024  # a WAV whose data chunk starts later is refused


class PcmFileReader:
    """Incremental WAV/raw parser: `feed(bytes)` returns one PCM run per channel."""

    def __init__(self) -> None:
        self.channels: int | None = None  # known once the header is parsed
        self._head = bytearray()
        self._carry = b""  # an incomplete sample frame from the previous piece
        self._data_left: int | None = None  # bytes of the WAV data chunk still to come

    def feed(self, data: bytes) -> list[bytes]:
        """PCM per channel found in `data` (empty lists until the header is complete)."""
        if self.channels is None:
            self._head += data
            if not self._parse_head():
                return []
            data, self._head = bytes(self._head), bytearray()
        if self._data_left is not None:
            data = data[: self._data_left]
            self._data_left -= len(data)
        return self._split(self._carry + data)

    def close(self) -> list[bytes]:
        """End of file: whatever header-less bytes remain are raw PCM."""
        if self.channels is None and self._head:
            self.channels = 1
            data, self._head = bytes(self._head), bytearray()
            return self._split(data)
        return []

    def _parse_head(self) -> bool:
        head = bytes(self._head)
        if len(head) < 12:
            return False
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            self.channels = 1
            return True
        pos, fmt = 12, None
        while pos + 8 <= len(head):
            kind, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            body = pos + 8
            if kind == b"fmt " and body + 16 <= len(head):
                fmt = struct.unpack_from("<HHIIHH", head, body)
            elif kind == b"data":
                self._start_data(fmt, size)
                del self._head[:body]
                return True
            pos = body + size + (size & 1)
        if len(head) > _HEADER_LIMIT:
            raise MediaStreamError("WAV file has no data chunk in its first 64 KiB")
        return False

    def _start_data(self, fmt: tuple[int, ...] | None, size: int) -> None:
        if fmt is None:
            raise MediaStreamError("WAV file has no fmt chunk before its data")
        codec, channels, rate, _, _, bits = fmt
        if (
            codec not in (1, 0xFFFE)
            or bits != 8 * BYTES_PER_SAMPLE
            or rate != SAMPLE_RATE
            or channels not in (1, 2)
        ):
            raise MediaStreamError(
                "WAV must be 16-bit PCM at 8000 Hz, mono or stereo; got "
                f"format {codec}, {bits} bits, {rate} Hz, {channels} channels"
            )
        self.channels = channels
        self._data_left = size if size not in (0, 0xFFFFFFFF) else None

    def _split(self, data: bytes) -> list[bytes]:
        frame = 2 * (self.channels or 1)
        whole = len(data) - len(data) % frame
        self._carry = data[whole:]
        data = data[:whole]
        if frame == 2:
            return [data]
        samples = array("h", data)  # 2-byte units; byte order is only copied, never read
        return [samples[0::2].tobytes(), samples[1::2].tobytes()]
