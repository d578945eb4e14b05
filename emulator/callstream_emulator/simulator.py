"""A stand-in for Amazon Connect: play a two-track call into KVS, then trigger.

Connect starts media streaming, then the contact flow invokes the trigger
with the stream ARN and the call's first fragment number. The simulator does
the same through the public APIs: CreateStream, PutMedia (paced like a live
call), ListFragments to learn the first fragment, then `trigger(...)`.
"""

from __future__ import annotations

import logging
import threading
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from callstream import aws
from callstream.mkv.writer import ConnectCallWriter
from callstream_emulator.kvs_producer import put_media

log = logging.getLogger(__name__)

Trigger = Callable[[str, str], None]


def read_wav_pcm(path: Path) -> bytes:
    """16-bit mono 8 kHz PCM of a WAV file; anything else is refused."""
    with wave.open(str(path), "rb") as wav:
        shape = (wav.getnchannels(), wav.getsampwidth(), wav.getframerate())
        if shape != (1, 2, 8000):
            raise ValueError(f"{path} must be 8 kHz 16-bit mono, is {shape}")
        return wav.readframes(wav.getnframes())


def ensure_kvs_stream(region: str, name: str) -> str:
    """Create the Kinesis Video stream if absent; return its ARN."""
    kvs = aws.client("kinesisvideo", region)
    try:
        return str(kvs.describe_stream(StreamName=name)["StreamInfo"]["StreamARN"])
    except kvs.exceptions.ResourceNotFoundException:
        return str(kvs.create_stream(StreamName=name, DataRetentionInHours=24)["StreamARN"])


class CallPlayer:
    """Plays one call's PCM as Connect-layout fragments into a KVS stream."""

    def __init__(
        self,
        customer_pcm: bytes,
        agent_pcm: bytes,
        *,
        contact_id: str,
        stream_name: str,
        region: str,
        speed: float = 1.0,
        instance_id: str = "00000000-0000-4000-8000-000000000000",
    ) -> None:
        self.customer = customer_pcm
        self.agent = agent_pcm
        self.region = region
        self.speed = speed
        self.stream_arn = ensure_kvs_stream(region, stream_name)
        self.start_ms = int(time.time() * 1000)
        self.writer = ConnectCallWriter(contact_id, instance_id, self.start_ms)
        self.acks: list[dict[str, Any]] = []

    def play(self, trigger: Trigger, timeout_s: float = 30.0) -> None:
        """Stream the call; call `trigger(stream_arn, first_fragment)` once KVS has it."""
        sender = threading.Thread(target=self._send, name="put-media", daemon=True)
        sender.start()
        trigger(self.stream_arn, self._first_fragment(timeout_s))
        sender.join()

    def _send(self) -> None:
        kvs = aws.client("kinesisvideo", self.region)
        endpoint = kvs.get_data_endpoint(StreamARN=self.stream_arn, APIName="PUT_MEDIA")
        credentials = aws.session(self.region).get_credentials()
        self.acks = put_media(
            endpoint["DataEndpoint"],
            self.stream_arn,
            self._paced_chunks(),
            region=self.region,
            credentials=credentials,
            timecode_type="ABSOLUTE",
            producer_start_ms=self.start_ms,
        )

    def _paced_chunks(self) -> Iterator[bytes]:
        yield self.writer.producer_header()
        step = self.writer.fragment_bytes
        started = time.monotonic()
        for offset in range(0, max(len(self.customer), len(self.agent)), step):
            due = started + (offset / 16000) / self.speed
            time.sleep(max(0.0, due - time.monotonic()))
            yield self.writer.producer_fragment(
                self.customer[offset : offset + step], self.agent[offset : offset + step]
            )

    def _first_fragment(self, timeout_s: float) -> str:
        archive = aws.client(
            "kinesis-video-archived-media",
            self.region,
            endpoint_url=aws.client("kinesisvideo", self.region).get_data_endpoint(
                StreamARN=self.stream_arn, APIName="LIST_FRAGMENTS"
            )["DataEndpoint"],
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listed = archive.list_fragments(StreamARN=self.stream_arn).get("Fragments", [])
            fragments = [f for f in listed if _epoch_ms(f["ProducerTimestamp"]) >= self.start_ms]
            if fragments:
                first = min(fragments, key=lambda f: int(f["FragmentNumber"]))
                return str(first["FragmentNumber"])
            time.sleep(0.05)
        raise TimeoutError(f"no fragment reached {self.stream_arn} within {timeout_s} s")


def _epoch_ms(value: Any) -> int:
    return int(value.timestamp() * 1000) if hasattr(value, "timestamp") else int(value * 1000)
