"""fastavro vs the Apache `avro` package on the hot record: one AudioChunkCaptured.

Encodes and decodes the same 128 ms chunk (2,048 bytes of PCM) with both
libraries, side by side in one run, alternating, and prints records per
CPU-second for each and the ratio. Like with like: both sides get the same
schema file (by default the version this process writes, today
AudioChunkCaptured v2; `--version 1` for the older one), the same record dict,
and the same work (schemaless body encode, then decode with writer = reader
schema; no single-object framing on either side). It prints the schema file
and asserts both sides decode to the same record.
Run: `.venv/bin/python bench/avro_codec.py [--version N]`.
"""

from __future__ import annotations

import argparse
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


def _schema_json(version: int) -> dict:
    """The schema file of that version, with the shared Track type inlined (both sides)."""
    track = json.loads((SCHEMAS_DIR / "Track.v1.avsc").read_text())
    chunk = json.loads((SCHEMAS_DIR / f"AudioChunkCaptured.v{version}.avsc").read_text())
    for field in chunk["fields"]:
        if field["name"] == "track":
            field["type"] = track
    return chunk


def _decode_once(record: dict, fast_schema: object, apache_schema: avro.schema.Schema) -> None:
    """Both libraries must read back the same record from their own bytes."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fast_schema, record)
    fast = fastavro.schemaless_reader(io.BytesIO(buf.getvalue()), fast_schema, fast_schema)
    buf = io.BytesIO()
    avro.io.DatumWriter(apache_schema).write(record, avro.io.BinaryEncoder(buf))
    body = buf.getvalue()
    apache = avro.io.DatumReader(apache_schema, apache_schema).read(
        avro.io.BinaryDecoder(io.BytesIO(body))
    )
    if fast != apache:
        raise SystemExit(f"fastavro and avro disagree:\n{fast}\n{apache}")


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    written = default_contract().writer_schema(_chunk().schema_name).version
    parser.add_argument("--version", type=int, default=written, help=f"default {written}")
    version = parser.parse_args().version
    schema = _schema_json(version)
    names = {f["name"] for f in schema["fields"]}
    record = {k: v for k, v in events.to_record(_chunk()).items() if k in names}
    fast_schema = fastavro.parse_schema(schema)
    apache_schema = avro.schema.parse(json.dumps(schema))
    _decode_once(record, fast_schema, apache_schema)
    fast, apache = [], []
    for _ in range(ROUNDS):
        fast.append(_fastavro_round(record, fast_schema))
        apache.append(_apache_round(record, apache_schema))
    fast_rate = RECORDS / statistics.median(fast)
    apache_rate = RECORDS / statistics.median(apache)
    print(
        f"AudioChunkCaptured encode+decode, both sides schemas/AudioChunkCaptured.v{version}.avsc "
        f"and the same {len(record['pcm'])}-byte-PCM record, "
        f"{RECORDS} records x {ROUNDS} alternating rounds"
    )
    print(f"  fastavro: {fast_rate:,.0f} records per CPU-second (median)")
    print(f"  avro:     {apache_rate:,.0f} records per CPU-second (median)")
    print(f"  fastavro / avro: {fast_rate / apache_rate:.1f}x")


if __name__ == "__main__":
    main()
