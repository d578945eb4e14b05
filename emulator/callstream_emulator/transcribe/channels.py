"""Channel splitting: one engine stream per channel of a request, results tagged by channel."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from callstream.asr.port import Hypothesis, RecognitionStream
from callstream.audio import BYTES_PER_SAMPLE

_log = logging.getLogger(__name__)


class Channels:
    """One engine stream per channel of a request: splits interleaved frames, tags results.

    A mono request's results carry no ChannelId. Calls are synchronous: the
    session runs them on a worker thread.
    """

    def __init__(self, streams: list[RecognitionStream]) -> None:
        self._streams = streams
        self._frame = BYTES_PER_SAMPLE * len(streams)
        self._carry = b""

    @property
    def identified(self) -> bool:
        return len(self._streams) > 1

    def send(self, pcm: bytes) -> None:
        if not self.identified:
            self._streams[0].send(pcm)
            return
        data = self._carry + pcm
        cut = len(data) - len(data) % self._frame
        self._carry = data[cut:]
        frames = np.frombuffer(data[:cut], dtype="<i2").reshape(-1, len(self._streams))
        for index, stream in enumerate(self._streams):
            stream.send(frames[:, index].tobytes())

    def poll(self) -> list[tuple[str | None, Hypothesis]]:
        return self._tag([stream.poll() for stream in self._streams])

    def close(self) -> list[tuple[str | None, Hypothesis]]:
        return self._tag([stream.close() for stream in self._streams])

    def close_quietly(self) -> None:
        for stream in self._streams:
            _close_quietly(stream)

    def _tag(self, per_channel: list[list[Hypothesis]]) -> list[tuple[str | None, Hypothesis]]:
        if not self.identified:
            return [(None, hypothesis) for hypothesis in per_channel[0]]
        tagged: list[tuple[str | None, Hypothesis]] = []
        for index, hypotheses in enumerate(per_channel):
            channel = f"ch_{index}"
            # Result ids are unique across channels, as the service's are.
            tagged.extend(
                (channel, dataclasses.replace(h, result_id=f"{channel}-{h.result_id}"))
                for h in hypotheses
            )
        return tagged


def _close_quietly(stream: RecognitionStream) -> None:
    try:
        stream.close()
    except Exception:
        _log.debug("engine stream failed while closing an abandoned stream", exc_info=True)
