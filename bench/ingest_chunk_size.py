"""Choosing CALLSTREAM_CHUNK_MS: records, bytes, shard capacity and CPU per chunk size.

Usage: .venv/bin/python bench/ingest_chunk_size.py [--minutes 5] [--sizes 32,64,100,128,160,200,256]

For each chunk size, runs the real ingest core and reader on a Connect call
(64 ms SimpleBlocks, as Connect writes them) fed in 1032-byte reads, Avro-
encodes every event with the contract, and reports per live call (two
tracks): KDS records per second, bytes per second (payload plus the
partition key), how many calls one shard takes under its 1,000 records/s
and 1 MiB/s write limits, PUT payload units per call-hour (one per record up
to 25 KiB), CPU per call-second, and how long the oldest sample of a chunk
waits for the chunk to fill (chunk_ms minus the 64 ms block that carries it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from callstream.contract import default_contract  # noqa: E402
from callstream.events import AudioChunkCaptured, EndReason  # noqa: E402
from callstream.mkv.reader import MkvStreamReader  # noqa: E402
from callstream.mkv.writer import write_connect_call  # noqa: E402
from services.ingest.core import CallIngest  # noqa: E402

CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
SHARD_RECORDS, SHARD_BYTES = 1000, 1 << 20
BLOCK_MS = 64


def measure(stream: bytes, seconds: float, chunk_ms: int) -> dict[str, float]:
    contract = default_contract()
    core, reader = CallIngest(CONTACT, chunk_ms), MkvStreamReader()
    records = size = 0
    cpu = time.process_time()
    for i in range(0, len(stream), 1032):
        for mkv_event in reader.feed(stream[i : i + 1032]):
            for event in core.accept(mkv_event):
                records += 1
                size += len(contract.encode(event)) + len(CONTACT)
    for event in core.finish(EndReason.END_OF_STREAM, "bench", 0):
        if isinstance(event, AudioChunkCaptured):
            records += 1
            size += len(contract.encode(event)) + len(CONTACT)
    cpu = time.process_time() - cpu
    return {
        "records_s": records / seconds,
        "bytes_s": size / seconds,
        "record_bytes": size / records,
        "cpu_per_call_s": cpu / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--sizes", default="32,64,100,128,160,200,256")
    args = parser.parse_args()
    seconds = args.minutes * 60
    pcm = bytes(range(256)) * int(seconds * 16000 // 256)
    stream = write_connect_call(pcm, pcm[::-1], CONTACT)
    print(f"{args.minutes:g}-minute two-track call; per live call:")
    print(
        "chunk_ms  records/s  record B  KB/s   calls/shard(rec)  calls/shard(bytes)"
        "  PUT units/call-h  CPU %/call  oldest-sample wait ms"
    )
    for chunk_ms in (int(s) for s in args.sizes.split(",")):
        m = measure(stream, seconds, chunk_ms)
        print(
            f"{chunk_ms:8d}  {m['records_s']:9.1f}  {m['record_bytes']:8.0f}"
            f"  {m['bytes_s'] / 1000:5.1f}"
            f"  {SHARD_RECORDS / m['records_s']:16.0f}  {SHARD_BYTES / m['bytes_s']:18.1f}"
            f"  {m['records_s'] * 3600:16,.0f}  {100 * m['cpu_per_call_s']:10.3f}"
            f"  {max(0, chunk_ms - BLOCK_MS):21d}"
        )


if __name__ == "__main__":
    main()
