"""Decode speed and first-frame latency of MkvStreamReader, against ebmlite.

Usage: .venv/bin/python bench/mkv_decode.py [--minutes 60] [--repeats 7]

Input, the same bytes for both sides: our own writer's output only
(`callstream.mkv.writer.write_connect_call`, the Connect GetMedia layout the
reader's fast paths are tuned for), never the real captures in
../shared/fixtures/kvs/ (those are for the correctness tests). It builds an
N-minute call (one fragment of 16 blocks per track per ~1 s; a tone on one
track, noise on the other), then decodes it in the same process, alternating:
  - MkvStreamReader fed 64 KiB chunks;
  - ebmlite (schema 'matroska'), loaded from an in-memory file, walking every
    element and reading its value, and splitting each SimpleBlock into track,
    timecode and payload as a consumer of ebmlite must.
CPU time (time.process_time) per run; medians reported. Then feeds one
fragment from the same writer (`ConnectCallWriter.getmedia_fragment`) in small
chunks to show where the first frame comes out.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import ebmlite
import numpy as np

from callstream.audio import SAMPLE_RATE
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import FrameRead
from callstream.mkv.writer import ConnectCallWriter, write_connect_call

CHUNK = 64 * 1024
CONTACT_ID = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"


def make_call(minutes: float) -> tuple[bytes, bytes]:
    """(customer, agent) 16-bit PCM: a 440 Hz tone and seeded noise."""
    n = int(minutes * 60 * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    tone = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    noise = np.random.default_rng(7).integers(-3000, 3000, n, dtype=np.int16).astype("<i2")
    return tone.tobytes(), noise.tobytes()


def decode_with_reader(stream: bytes) -> tuple[int, int]:
    """(frames, payload bytes) from MkvStreamReader fed in 64 KiB chunks."""
    reader = MkvStreamReader()
    frames = payload = 0
    view = memoryview(stream)
    for i in range(0, len(stream), CHUNK):
        for event in reader.feed(view[i : i + CHUNK]):
            if isinstance(event, FrameRead):
                frames += 1
                payload += len(event.data)
    reader.close()
    return frames, payload


def decode_with_ebmlite(stream: bytes, schema: Any) -> tuple[int, int]:
    """(frames, payload bytes) from an ebmlite walk of the whole document."""
    counts = [0, 0]

    def walk(element: Any) -> None:
        for child in element:
            if isinstance(child, ebmlite.core.MasterElement):
                walk(child)
            elif child.id == 0xA3:
                block = child.value
                _track, _timecode = block[0] & 0x7F, int.from_bytes(block[1:3], "big", signed=True)
                counts[0] += 1
                counts[1] += len(block[4:])
            else:
                _ = child.value

    walk(schema.load(io.BytesIO(stream), headers=True))
    return counts[0], counts[1]


def timed(run: Callable[[], tuple[int, int]]) -> tuple[float, tuple[int, int]]:
    """CPU seconds of one run.

    Every run starts from a full collection with the objects alive at that
    point frozen, so garbage collections during the run walk only what the
    decoder itself creates, not the 100 MB setup (same rule for both sides).
    """
    gc.collect()
    gc.freeze()
    try:
        start = time.process_time()
        result = run()
        return time.process_time() - start, result
    finally:
        gc.unfreeze()


def first_frame_offset(piece: int) -> tuple[int, int]:
    """(bytes fed when the first FrameRead came out, fragment length)."""
    writer = ConnectCallWriter(CONTACT_ID, "3087be6e-771a-48a8-90da-93b5326a43a1", 1782912654536)
    pcm = bytes(range(256)) * 64
    fragment = writer.getmedia_fragment(
        pcm,
        pcm,
        fragment_number="91343852333181551234925834077012571618243808844",
        server_ts=1782912654.706,
        producer_ts=1782912654.536,
        millis_behind_now=131207,
        continuation_token="91343852333181551234925834077012571618243808844",
    )
    reader = MkvStreamReader()
    for i in range(0, len(fragment), piece):
        if any(isinstance(e, FrameRead) for e in reader.feed(fragment[i : i + piece])):
            return min(i + piece, len(fragment)), len(fragment)
    return -1, len(fragment)


def compare(stream: bytes, call_seconds: float, repeats: int) -> None:
    """Alternate the two decoders `repeats` times; print medians and the ratio."""
    schema = ebmlite.loadSchema("matroska.xml")
    times: dict[str, list[float]] = {"MkvStreamReader": [], "ebmlite": []}
    results: dict[str, tuple[int, int]] = {}
    for _ in range(repeats):
        for name, run in (
            ("MkvStreamReader", lambda: decode_with_reader(stream)),
            ("ebmlite", lambda: decode_with_ebmlite(stream, schema)),
        ):
            seconds, results[name] = timed(run)
            times[name].append(seconds)
    if results["MkvStreamReader"] != results["ebmlite"]:
        raise SystemExit(f"decoders disagree: {results}")
    frames, payload = results["MkvStreamReader"]
    print(f"both decoded {frames:,} frames, {payload:,} payload bytes")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        runs = ", ".join(f"{v:.3f}" for v in times[name])
        print(
            f"{name:>16}: median {median:.3f} CPU-s (runs {runs}) = "
            f"{call_seconds / median:,.0f} call-seconds per CPU-second"
        )
    ratio = medians["ebmlite"] / medians["MkvStreamReader"]
    print(f"speed ratio, MkvStreamReader over ebmlite: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    customer, agent = make_call(args.minutes)
    stream = write_connect_call(customer, agent, CONTACT_ID)
    call_seconds = len(customer) / 2 / SAMPLE_RATE
    digest = hashlib.sha256(stream).hexdigest()[:16]
    print(
        f"input (both decoders): write_connect_call output, our writer's GetMedia layout, "
        f"{call_seconds:.0f} s of call, 2 tracks, {len(stream):,} bytes, sha256 {digest}"
    )
    compare(stream, call_seconds, args.repeats)
    for piece in (16, 256):
        offset, length = first_frame_offset(piece)
        print(
            f"latency (one ConnectCallWriter.getmedia_fragment): fed in {piece}-byte chunks, "
            f"first FrameRead out after {offset:,} of the fragment's {length:,} bytes "
            f"({100 * offset / length:.1f}%)"
        )


if __name__ == "__main__":
    main()
