"""The event contract: Avro schemas from `schemas/`, single-object framing.

This is the only module that knows the wire format of a Kinesis record:

    C3 01 | 8-byte CRC-64-AVRO fingerprint (little-endian) | Avro binary body

A reader looks the fingerprint up among every schema version it knows and
resolves the writer's schema to its own (the newest version of that record),
so old and new producers and consumers coexist. Schemas are parsed once.

A writer writes the newest version of each record unless pinned to an older
one (`CALLSTREAM_WRITER_SCHEMAS=AudioChunkCaptured=1`, read once by
`default_contract()`), so producers can be rolled out before their consumers.
A fingerprint this process does not know raises `UnknownWriterSchema`: the
consumer loop pauses the shard instead of dead-lettering (docs/schema-rollouts.md).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from callstream import events
from callstream.config import WRITER_SCHEMAS, Env
from callstream.errors import ConfigError, PoisonRecordError, UnknownWriterSchema

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
    """Encodes events to framed Avro and decodes framed Avro to events.

    `pins` maps a record name (`AudioChunkCaptured` or its full name) to the
    version to write instead of the newest; an unknown name or version is a
    ConfigError. Reading always resolves to the newest version.
    """

    def __init__(
        self, schemas_dir: Path = SCHEMAS_DIR, pins: Mapping[str, int] | None = None
    ) -> None:
        self.versions = _load_versions(schemas_dir)
        self._by_fingerprint = {v.fingerprint: v for v in self.versions}
        self._latest: dict[str, SchemaVersion] = {}
        for v in sorted(self.versions, key=lambda v: v.version):
            self._latest[v.full_name] = v
        self._classes = {cls.schema_name: cls for cls in events.EVENT_TYPES}
        missing = set(self._classes) - set(self._latest)
        if missing:
            raise RuntimeError(f"no schema file for events {sorted(missing)} in {schemas_dir}")
        self._writer = {**self._latest, **self._pinned(pins or {})}

    def writer_schema(self, full_name: str) -> SchemaVersion:
        """The version this process writes for a record name: the newest, or its pin."""
        return self._writer[full_name]

    def _pinned(self, pins: Mapping[str, int]) -> dict[str, SchemaVersion]:
        by_short = {name.rsplit(".", 1)[-1]: name for name in self._latest}
        pinned: dict[str, SchemaVersion] = {}
        for name, version in pins.items():
            full_name = name if name in self._latest else by_short.get(name)
            if full_name is None:
                raise ConfigError(
                    f"pin {name}={version}: no record of that name "
                    f"(known: {', '.join(sorted(by_short))})"
                )
            found = [v for v in self.versions if v.full_name == full_name]
            chosen = [v for v in found if v.version == version]
            if not chosen:
                have = ", ".join(f"v{v.version}" for v in sorted(found, key=lambda v: v.version))
                raise ConfigError(
                    f"pin {name}={version}: no schema file "
                    f"{full_name.rsplit('.', 1)[-1]}.v{version}.avsc (have {have})"
                )
            pinned[full_name] = chosen[0]
        return pinned

    def encode(self, event: events.Event) -> bytes:
        """Frame one event as an Avro single-object record."""
        schema = self._writer[event.schema_name]
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
            raise UnknownWriterSchema(fp.hex())
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
    """The process-wide contract, parsed on first use, writing the pinned versions of
    `CALLSTREAM_WRITER_SCHEMAS` (services validate it at start-up: `BusSettings`)."""
    pins = Env().pins(WRITER_SCHEMAS)
    try:
        return Contract(pins=pins)
    except ConfigError as e:
        raise ConfigError(f"{WRITER_SCHEMAS}: {e}") from e
