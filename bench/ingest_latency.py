"""Latency inside ingest: a SimpleBlock's bytes arriving -> its AudioChunk handed to the producer.

Usage: .venv/bin/python bench/ingest_latency.py [--minutes 10] [--piece 1032] [--chunk-ms 128]

Builds an Amazon Connect call as GetMedia returns it and runs the real
`CallSession` on it, with a media edge that hands the bytes over in `piece`
byte reads (1032 B is one 64 ms SimpleBlock, as a live GetMedia delivers
them; 65536 is a full socket read of a backlog) and a sink that Avro-encodes
every event as the Kinesis publisher does. For each chunk it measures the
time from the read that completed it arriving to `publish` being called
(perf_counter), and where in its fragment the first chunk of each fragment
came out (a reader that waited for fragment ends would show 100%).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callstream.contract import default_contract  # noqa: E402
from callstream.events import AudioChunkCaptured, CallStarted  # noqa: E402
from callstream.mkv.writer import write_connect_call  # noqa: E402
from services.ingest.session import CallSession  # noqa: E402

CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"


class PacedBody:
    """The media edge: yields `piece`-byte reads, noting when each arrived."""

    region = "us-east-1"

    def __init__(self, stream: bytes, piece: int) -> None:
        self.stream, self.piece = stream, piece
        self.arrived = 0.0
        self.position = 0

    def get_fragments(self, arn: str, numbers: list[str]) -> Generator[bytes, None, None]:
        return self.get_media(arn, {})

    def get_media(self, arn: str, selector: dict[str, Any]) -> Generator[bytes, None, None]:
        while self.position < len(self.stream):
            data = self.stream[self.position : self.position + self.piece]
            self.position += len(data)
            self.arrived = time.perf_counter()
            yield data

    def endpoint_stale(self, arn: str, api: str = "GET_MEDIA") -> bool:
        return False

    def release(self, arn: str) -> None:
        pass


class TimingSink:
    """Encodes each event (as the publisher would) and records latencies."""

    stream = "audio"

    def __init__(self, body: PacedBody, fragment_starts: list[int]) -> None:
        self.body, self.contract = body, default_contract()
        self.starts = fragment_starts
        self.latencies_us: list[float] = []
        self.first_chunk_at: dict[str, float] = {}

    def publish(self, events: Any) -> None:
        for event in events:
            self.contract.encode(event)
        done = time.perf_counter()
        for event in events:
            if isinstance(event, AudioChunkCaptured):
                self.latencies_us.append((done - self.body.arrived) * 1e6)
                self.first_chunk_at.setdefault(event.fragment_number, self._into_fragment())

    def _into_fragment(self) -> float:
        import bisect

        index = bisect.bisect_right(self.starts, self.body.position - 1) - 1
        start = self.starts[index]
        end = self.starts[index + 1] if index + 1 < len(self.starts) else len(self.body.stream)
        return (self.body.position - start) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--piece", type=int, default=1032)
    parser.add_argument("--chunk-ms", type=int, default=128)
    args = parser.parse_args()
    samples = int(args.minutes * 60 * 8000)
    pcm = bytes(range(256)) * (samples * 2 // 256)
    stream = write_connect_call(pcm, pcm[::-1], CONTACT)
    starts, at = [], stream.find(b"\x1a\x45\xdf\xa3")
    while at >= 0:
        starts.append(at)
        at = stream.find(b"\x1a\x45\xdf\xa3", at + 1)
    body = PacedBody(stream, args.piece)
    sink = TimingSink(body, starts)
    call = CallStarted(CONTACT, "arn:bench", 0, start_fragment_number=None)
    cpu = time.process_time()
    CallSession(call, body, sink, args.chunk_ms).run()
    cpu = time.process_time() - cpu
    lat = sorted(sink.latencies_us)
    firsts = sorted(sink.first_chunk_at.values())
    print(
        f"{args.minutes:g} min call, {len(stream):,} bytes in {args.piece}-byte reads,"
        f" chunk {args.chunk_ms} ms"
    )
    print(
        f"  {len(lat):,} chunks; read arrived -> publish(): p50 {lat[len(lat) // 2]:.0f} us,"
        f" p99 {lat[int(len(lat) * 0.99)]:.0f} us, max {lat[-1]:.0f} us"
    )
    print(
        f"  first chunk of a fragment handed over after {100 * statistics.median(firsts):.1f}% of"
        f" the fragment's bytes (median; max {100 * firsts[-1]:.1f}%)"
    )
    print(
        f"  CPU {cpu:.2f} s = {args.minutes * 60 / cpu:,.0f} call-seconds per CPU-second"
        " (incl. Avro)"
    )


if __name__ == "__main__":
    main()
