"""The event contract: Avro schemas from `schemas/`, single-object framing.

This is the only module that knows the wire format of a Kinesis record:

    C3 01 | 8-byte CRC-64-AVRO fingerprint (little-endian) | Avro binary body

A reader looks the fingerprint up among every schema version it knows and
resolves the writer's schema to its own (the newest version of that record),
so old and new producers and consumers coexist. Schemas are parsed once.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from callstream import events
from callstream.errors import PoisonRecordError

MAGIC = b"\xc3\x01"
HEADER_LENGTH = 10
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
_FILE_NAME = re.compile(r"^(?P<name>\w+)\.v(?P<version>\d+)\.avsc$")
_SHARED_TYPES = ("Track",)  # named types other schemas refer to by name


@dataclass(frozen=True)
class SchemaVersion:
    """One parsed schema file."""

    full_name: str
    version: int
    parsed: Any
    fingerprint: bytes


class Contract:
    """Encodes events to framed Avro and decodes framed Avro to events."""

    def __init__(self, schemas_dir: Path = SCHEMAS_DIR) -> None:
        self.versions = _load_versions(schemas_dir)
        self._by_fingerprint = {v.fingerprint: v for v in self.versions}
        self._latest: dict[str, SchemaVersion] = {}
        for v in sorted(self.versions, key=lambda v: v.version):
            self._latest[v.full_name] = v
        self._classes = {cls.schema_name: cls for cls in events.EVENT_TYPES}
        missing = set(self._classes) - set(self._latest)
        if missing:
            raise RuntimeError(f"no schema file for events {sorted(missing)} in {schemas_dir}")

    def writer_schema(self, full_name: str) -> SchemaVersion:
        """The version this process writes for a record name: the newest."""
        return self._latest[full_name]

    def encode(self, event: events.Event) -> bytes:
        """Frame one event as an Avro single-object record."""
        schema = self._latest[event.schema_name]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        fastavro.schemaless_writer(buf, schema.parsed, events.to_record(event))
        return buf.getvalue()

    def decode(self, data: bytes) -> events.Event:
        """Parse one framed record; raise PoisonRecordError with the reason if impossible."""
        writer = self._writer_of(data)
        reader = self._latest[writer.full_name]
        try:
            record = fastavro.schemaless_reader(
                io.BytesIO(data[HEADER_LENGTH:]), writer.parsed, reader.parsed
            )
        except Exception as e:  # fastavro raises many types for bad bytes
            raise PoisonRecordError(
                f"Avro body of {writer.full_name} v{writer.version} does not decode: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not isinstance(record, dict):
            raise PoisonRecordError(f"{writer.full_name} decoded to {type(record).__name__}")
        return events.from_record(self._classes[writer.full_name], record)

    def _writer_of(self, data: bytes) -> SchemaVersion:
        if len(data) < HEADER_LENGTH or data[:2] != MAGIC:
            raise PoisonRecordError(
                f"not an Avro single-object record: expected marker C3 01 and an 8-byte "
                f"fingerprint, got {len(data)} bytes starting {data[:4].hex() or 'nothing'}"
            )
        fp = bytes(data[2:HEADER_LENGTH])
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise PoisonRecordError(f"unknown schema fingerprint {fp.hex()}: no schema file has it")
        return writer


def _load_versions(schemas_dir: Path) -> list[SchemaVersion]:
    shared: dict[str, Any] = {}
    for name in _SHARED_TYPES:
        (path,) = sorted(schemas_dir.glob(f"{name}.v*.avsc"))[-1:]
        parse_schema(json.loads(path.read_text()), named_schemas=shared)
    versions = []
    for path in sorted(schemas_dir.glob("*.avsc")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise RuntimeError(f"schema file {path.name} is not named <Record>.v<N>.avsc")
        if match["name"] in _SHARED_TYPES:
            continue
        parsed = parse_schema(json.loads(path.read_text()), named_schemas=dict(shared))
        canonical = to_parsing_canonical_form(parsed)
        assert isinstance(parsed, dict)
        versions.append(
            SchemaVersion(
                full_name=parsed["name"],
                version=int(match["version"]),
                parsed=parsed,
                fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
            )
        )
    return versions


@cache
def default_contract() -> Contract:
    """The process-wide contract, parsed on first use."""
    return Contract()
