"""The Avro contract: every event round-trips; every schema version reads the previous one."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import fastavro
import fastavro.utils
import pytest
from fastavro.schema import parse_schema

from callstream import events as ev
from callstream.contract import HEADER_LENGTH, MAGIC, SCHEMAS_DIR, Contract
from callstream.errors import PoisonRecordError

CONTRACT = Contract()

SAMPLES: list[ev.Event] = [
    ev.CallStarted(
        contact_id="c-1",
        stream_arn="arn:aws:kinesisvideo:us-east-1:123456789012:stream/s/1700000000000",
        requested_at_ms=1,
        start_fragment_number="913438523331815512349",
        transcription_enabled=False,
        language_code="es-US",
        instance_id="i-1",
        attributes={"transcribeCall": "false"},
    ),
    ev.AudioChunkCaptured(
        contact_id="c-1",
        track=ev.Track.TO_CUSTOMER,
        sequence=7,
        sample_offset=7168,
        offset_ms=896,
        start_time_ms=1782912655432,
        pcm=bytes(range(256)) * 8,
        fragment_number="91343852333181551234925834077012571618243808844",
    ),
    ev.CallEnded(
        contact_id="c-1",
        reason=ev.EndReason.CONTACT_CHANGED,
        ended_at_ms=5,
        detail="stream now carries contact c-2",
        last_fragment_number="9",
        chunk_counts={"AUDIO_FROM_CUSTOMER": 3, "AUDIO_TO_CUSTOMER": 4},
        call_start_time_ms=1782912654536,
    ),
    ev.TranscriptSegmentProduced(
        contact_id="c-1",
        track=ev.Track.FROM_CUSTOMER,
        segment_id="c-1:AUDIO_FROM_CUSTOMER:1200",
        start_ms=1200,
        end_ms=2400,
        transcript="hello there",
        is_partial=False,
        words=(ev.WordTiming("hello", 1200, 1600, 0.9), ev.WordTiming("there", 1700, 2400)),
        engine="test",
        language_code="en-US",
        call_start_time_ms=1782912654536,
    ),
    ev.DeadLetter(
        service="recorder",
        source_stream="audio",
        shard_id="shardId-000000000000",
        sequence_number="4960",
        partition_key="c-1",
        reason="bad bytes",
        error_type="PoisonRecordError",
        failed_at_ms=9,
        data=b"\x00\x01garbage",
    ),
    ev.RecordingStored(
        contact_id="c-1",
        s3_uri="s3://recordings/recordings/c-1_2026-06-01T12:30:54.536Z.wav",
        bucket="recordings",
        key="recordings/c-1_2026-06-01T12:30:54.536Z.wav",
        format="stereo",
        channel_tracks=(ev.Track.FROM_CUSTOMER, ev.Track.TO_CUSTOMER),
        channels=2,
        sample_rate=8000,
        duration_ms=48_512,
        byte_count=1_552_428,
        checksum_algorithm="CRC32",
        checksum="AawuMQ==",
        call_start_time_ms=1782912654536,
    ),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_single_object_encoding(event: ev.Event) -> None:
    data = CONTRACT.encode(event)
    assert data[:2] == MAGIC
    assert data[2:HEADER_LENGTH] == CONTRACT.writer_schema(event.schema_name).fingerprint
    assert CONTRACT.decode(data) == event


def _schema_files() -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = {}
    for path in sorted(SCHEMAS_DIR.glob("*.v*.avsc")):
        by_name.setdefault(path.name.split(".v")[0], []).append(path)
    return by_name


def _pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for paths in _schema_files().values():
        ordered = sorted(paths, key=lambda p: int(p.name.split(".v")[1].split(".")[0]))
        pairs.extend(itertools.pairwise(ordered))
    return pairs


def test_some_schema_has_more_than_one_version() -> None:
    assert _pairs(), "the compatibility test below needs at least one evolved schema"


@pytest.mark.parametrize("old,new", _pairs(), ids=lambda p: p.name)
def test_newer_schema_reads_records_of_the_previous_version(old: Path, new: Path) -> None:
    track = json.loads((SCHEMAS_DIR / "Track.v1.avsc").read_text())
    writer = parse_schema(json.loads(old.read_text()), named_schemas=_named(track))
    reader = parse_schema(json.loads(new.read_text()), named_schemas=_named(track))
    record = fastavro.utils.generate_one(writer)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, writer, record)
    buf.seek(0)
    read = fastavro.schemaless_reader(buf, writer, reader)
    assert isinstance(read, dict)
    for key, value in record.items():
        assert read[key] == value


def _named(track_schema: dict) -> dict:
    named: dict = {}
    parse_schema(track_schema, named_schemas=named)
    return named


def test_reader_decodes_a_record_written_with_the_old_transcript_schema() -> None:
    old = next(
        v for v in CONTRACT.versions if v.full_name.endswith("SegmentProduced") and v.version == 1
    )
    record = ev.to_record(SAMPLES[3])
    for new_field in ("engine", "language_code", "call_start_time_ms"):
        record.pop(new_field)
    buf = io.BytesIO()
    buf.write(MAGIC + old.fingerprint)
    fastavro.schemaless_writer(buf, old.parsed, record)
    decoded = CONTRACT.decode(buf.getvalue())
    assert isinstance(decoded, ev.TranscriptSegmentProduced)
    assert decoded.transcript == "hello there"
    assert decoded.engine == ""


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"", "not an Avro single-object record"),
        (b'{"json": true}', "not an Avro single-object record"),
        (MAGIC + b"\x00" * 8 + b"x", "unknown schema fingerprint"),
    ],
)
def test_undecodable_bytes_raise_poison_with_the_reason(data: bytes, expected: str) -> None:
    with pytest.raises(PoisonRecordError, match=expected):
        CONTRACT.decode(data)


def test_truncated_body_is_poison_not_a_crash() -> None:
    data = CONTRACT.encode(SAMPLES[1])
    with pytest.raises(PoisonRecordError, match="does not decode"):
        CONTRACT.decode(data[:40])
