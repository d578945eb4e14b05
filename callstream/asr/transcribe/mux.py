"""The pure half of a stereo Transcribe stream: interleaving two tracks, mapping times back.

`StereoMux` interleaves two mono channels into 2-channel frames, padding a
channel that lags or has no handle; each handle's `ChannelClock` maps stream
time back to "ms of audio sent to this handle" over a `RunMap`. No I/O, no
clock, no threads: `stereo.py` drives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from callstream.audio import BYTES_PER_SAMPLE, SAMPLES_PER_MS
from callstream.timemap import RunMap


class ChannelClock:
    """Maps stereo-stream time to one handle's own time (audio sent to the handle).

    Padding inserted into the channel maps to the handle time at which it was
    inserted, so a time inside padding and the audio edges around it agree.
    """

    def __init__(self) -> None:
        self._runs = RunMap()  # (stream sample, handle sample, samples)
        self.samples = 0  # handle samples so far

    def audio(self, stream_at: int, samples: int) -> None:
        """`samples` of the handle's audio occupy the stream from sample `stream_at`."""
        if samples <= 0:
            return
        self._runs.add(stream_at, self.samples, samples)
        self.samples += samples

    def to_handle_ms(self, stream_ms: int) -> int:
        """Handle time of a stream time; before the handle's first audio, 0."""
        at = stream_ms * SAMPLES_PER_MS
        i = self._runs.index(at)
        if i < 0:
            return 0
        s0, h0, n = self._runs[i]
        return (h0 + min(at - s0, n)) // SAMPLES_PER_MS

    def span(self, start_ms: int, end_ms: int) -> tuple[int, int] | None:
        """Handle-time span of a stream-time span; None if it lies wholly in padding."""
        start, end = self.to_handle_ms(start_ms), self.to_handle_ms(end_ms)
        if end <= start and end_ms > start_ms:
            return None
        return start, max(start, end)


class _SlotState(Enum):
    VACANT = "vacant"  # no handle: silence
    OPEN = "open"  # a handle sends audio
    DONE = "done"  # the handle closed: silence to the end


@dataclass
class _Slot:
    state: _SlotState = _SlotState.VACANT
    backlog: bytearray = field(default_factory=bytearray)
    position: int = 0  # stream samples placed on this channel (sent and backlog)
    clock: ChannelClock | None = None
    carry: bytes = b""

    @property
    def queued(self) -> int:
        return len(self.backlog) // BYTES_PER_SAMPLE

    def pad(self, samples: int) -> None:
        self.backlog += bytes(samples * BYTES_PER_SAMPLE)
        self.position += samples


class StereoMux:
    """Two mono channels in, interleaved 2-channel s16le frames out. Pure: no I/O.

    A frame is released once both open channels have its sample. When an open
    channel is more than `max_lag_ms` behind the other, it is padded with
    silence up to it (at `max_lag_ms` or more); vacant and finished channels
    are padded as needed.
    """

    def __init__(self, max_lag_ms: int = 1000) -> None:
        self.max_lag_samples = max_lag_ms * SAMPLES_PER_MS
        self._slots = (_Slot(), _Slot())
        self.sent_samples = 0  # frames released
        self.padded_samples = [0, 0]  # silence inserted per channel

    def queued(self, channel: int) -> int:
        """Samples of `channel` waiting to be released."""
        return self._slots[channel].queued

    def attach(self, channel: int, lead_in_samples: int = 0) -> ChannelClock:
        """A handle takes a vacant channel, after `lead_in_samples` of silence."""
        slot = self._slots[channel]
        if slot.state is not _SlotState.VACANT:
            raise ValueError(f"channel {channel} is already taken ({slot.state.value})")
        slot.state, slot.clock = _SlotState.OPEN, ChannelClock()
        self._pad(channel, lead_in_samples)
        return slot.clock

    def push(self, channel: int, pcm: bytes) -> None:
        """Queue a handle's mono PCM on its channel."""
        slot = self._slots[channel]
        if slot.state is not _SlotState.OPEN or slot.clock is None:
            raise ValueError(f"channel {channel} takes no audio ({slot.state.value})")
        data = slot.carry + pcm
        cut = len(data) - len(data) % BYTES_PER_SAMPLE
        slot.carry = data[cut:]
        samples = cut // BYTES_PER_SAMPLE
        slot.clock.audio(slot.position, samples)
        slot.backlog += data[:cut]
        slot.position += samples

    def finish(self, channel: int) -> None:
        """The channel's handle closed: silence from the end of its queued audio on."""
        slot = self._slots[channel]
        if slot.state is _SlotState.OPEN:
            slot.state = _SlotState.DONE

    def take(self) -> bytes:
        """Frames that are ready now (maybe none)."""
        open_slots = [s for s in self._slots if s.state is _SlotState.OPEN]
        if len(open_slots) == 2:
            lag, lead = sorted(open_slots, key=lambda s: s.queued)
            # At the bound, not past it: a 1 s keep-alive on one track goes out at once.
            if lead.queued - lag.queued >= self.max_lag_samples:
                self._pad(self._slots.index(lag), lead.queued - lag.queued)
            count = min(s.queued for s in open_slots)
        elif open_slots:
            count = open_slots[0].queued
        else:
            count = max(s.queued for s in self._slots)
        return self._release(count)

    def flush(self) -> bytes:
        """Every queued sample, the other channel padded to match: the end of the stream."""
        return self._release(max(s.queued for s in self._slots))

    def _release(self, count: int) -> bytes:
        if count <= 0:
            return b""
        frames = np.empty((count, 2), dtype="<i2")
        for index, slot in enumerate(self._slots):
            self._pad(index, count - slot.queued)
            size = count * BYTES_PER_SAMPLE
            frames[:, index] = np.frombuffer(bytes(slot.backlog[:size]), dtype="<i2")
            del slot.backlog[:size]
        self.sent_samples += count
        return frames.tobytes()

    def _pad(self, channel: int, samples: int) -> None:
        if samples > 0:
            self._slots[channel].pad(samples)
            self.padded_samples[channel] += samples
