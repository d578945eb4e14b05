"""fastavro vs the Apache `avro` package on the hot record: one AudioChunkCaptured.

Encodes and decodes the same 128 ms chunk (2,048 bytes of PCM) with both
libraries, side by side in one run, alternating, and prints records per
CPU-second for each and the ratio. Run: `.venv/bin/python bench/avro_codec.py`.
"""

from __future__ import annotations

import io
import json
import statistics
import time

import avro.io
import avro.schema
import fastavro

from callstream import events
from callstream.contract import SCHEMAS_DIR, default_contract

ROUNDS = 5
RECORDS = 5_000


def _chunk() -> events.AudioChunkCaptured:
    return events.AudioChunkCaptured(
        contact_id="87718f4a-d2ed-476a-ad11-f496ab09b3f8",
        track=events.Track.FROM_CUSTOMER,
        sequence=1234,
        sample_offset=1234 * 1024,
        offset_ms=1234 * 128,
        start_time_ms=1_782_912_654_536,
        pcm=bytes(range(256)) * 8,
        fragment_number="91343852333181551234925834077012571618243808844",
    )


def _apache_schema() -> avro.schema.Schema:
    track = json.loads((SCHEMAS_DIR / "Track.v1.avsc").read_text())
    chunk = json.loads((SCHEMAS_DIR / "AudioChunkCaptured.v1.avsc").read_text())
    for field in chunk["fields"]:
        if field["name"] == "track":
            field["type"] = track
    return avro.schema.parse(json.dumps(chunk))


def _fastavro_round(record: dict, schema: object) -> float:
    started = time.process_time()
    for _ in range(RECORDS):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, record)
        buf.seek(0)
        fastavro.schemaless_reader(buf, schema, schema)
    return time.process_time() - started


def _apache_round(record: dict, schema: avro.schema.Schema) -> float:
    writer, reader = avro.io.DatumWriter(schema), avro.io.DatumReader(schema, schema)
    started = time.process_time()
    for _ in range(RECORDS):
        buf = io.BytesIO()
        writer.write(record, avro.io.BinaryEncoder(buf))
        buf.seek(0)
        reader.read(avro.io.BinaryDecoder(buf))
    return time.process_time() - started


def main() -> None:
    record = events.to_record(_chunk())
    fast_schema = default_contract().writer_schema(_chunk().schema_name).parsed
    apache_schema = _apache_schema()
    fast, apache = [], []
    for _ in range(ROUNDS):
        fast.append(_fastavro_round(record, fast_schema))
        apache.append(_apache_round(record, apache_schema))
    fast_rate = RECORDS / statistics.median(fast)
    apache_rate = RECORDS / statistics.median(apache)
    print(f"AudioChunkCaptured encode+decode, {RECORDS} records x {ROUNDS} alternating rounds")
    print(f"  fastavro: {fast_rate:,.0f} records per CPU-second (median)")
    print(f"  avro:     {apache_rate:,.0f} records per CPU-second (median)")
    print(f"  fastavro / avro: {fast_rate / apache_rate:.1f}x")


if __name__ == "__main__":
    main()
