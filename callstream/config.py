"""Settings, read from the environment once per process and validated at start-up.

The reference Lambda's variable names keep their meaning (`APP_REGION`,
`TRANSCRIBE_REGION`, `RECORDINGS_BUCKET_NAME`, `RECORDINGS_KEY_PREFIX`,
`RECORDINGS_PUBLIC_READ_ACL`, `INPUT_KEY_PREFIX`, `CONSOLE_LOG_TRANSCRIPT_FLAG`,
`TABLE_CALLER_TRANSCRIPT`, `TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER`,
`SAVE_PARTIAL_TRANSCRIPTS`, `START_SELECTOR_TYPE`); the project's own settings
are prefixed `CALLSTREAM_`. Where AWS is (real, LocalStack, the embedded
emulator) is boto3's own business: `AWS_ENDPOINT_URL`, region, credentials chain.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from callstream.errors import ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_PIN = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)=v?(?P<version>\d+)$")
WRITER_SCHEMAS = "CALLSTREAM_WRITER_SCHEMAS"  # Record=version,...: pinned producer versions


class Env:
    """Typed, validated reads from an environment mapping; errors name the variable."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ

    def text(self, name: str, default: str | None = None) -> str:
        """A required string (or its default)."""
        value = self._env.get(name, default)
        if value is None or value == "":
            if default is not None:
                return default
            raise ConfigError(f"{name} is required but not set")
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        """TRUE/FALSE (any case), 1/0, yes/no, on/off."""
        raw = self._env.get(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name} must be TRUE or FALSE, got {raw!r}")

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        """An integer within [minimum, maximum]."""
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value

    def region(self, name: str, default: str) -> str:
        """An AWS region name such as us-east-1."""
        value = self.text(name, default)
        if not _REGION.match(value):
            raise ConfigError(f"{name} must be an AWS region like us-east-1, got {value!r}")
        return value

    def name(self, name: str, default: str) -> str:
        """A stream or table name."""
        value = self.text(name, default)
        if not _NAME.match(value):
            raise ConfigError(f"{name} must be a stream/table name ([A-Za-z0-9_.-]), got {value!r}")
        return value

    def pins(self, name: str) -> dict[str, int]:
        """`Record=version,...` (e.g. `AudioChunkCaptured=1,CallEnded=1`); empty: no pins."""
        raw = self._env.get(name, "")
        pins: dict[str, int] = {}
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            match = _PIN.match(item.replace(" ", ""))
            if match is None:
                raise ConfigError(
                    f"{name} must be Record=version pairs separated by commas "
                    f"(e.g. AudioChunkCaptured=1,CallEnded=1), got {item!r}"
                )
            if match["name"] in pins:
                raise ConfigError(f"{name} pins {match['name']} twice")
            pins[match["name"]] = int(match["version"])
        return pins

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of a fixed set of values (case-insensitive)."""
        value = self.text(name, default)
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class BusSettings:
    """Where the services' Kinesis Data Streams and lease table are."""

    region: str
    calls_stream: str
    audio_stream: str
    transcripts_stream: str
    deadletter_stream: str
    lease_table: str
    worker_id: str
    poll_interval_ms: int
    progress_table: str = "callstream-progress"
    writer_pins: tuple[tuple[str, int], ...] = ()  # what default_contract() writes, if pinned
    publish_deadline_s: float = 120.0  # a publish still refused after this raises (retried)
    read_mode: str = "polling"  # or "efo": enhanced fan-out (SubscribeToShard)
    poll_groups: int = 0  # consumer groups polling one shard; 0: the stream's usual readers
    efo_consumer_arn: str = ""  # a registered consumer (the template's); else registered by name
    efo_consumer_name: str = ""  # the consumer to register; empty: the service's name

    @classmethod
    def from_env(cls, env: Env) -> BusSettings:
        """Read CALLSTREAM_*_STREAM, CALLSTREAM_{LEASE,PROGRESS}_TABLE, APP_REGION and the
        writer pins (CALLSTREAM_WRITER_SCHEMAS, checked against the schema files)."""
        return cls(
            region=env.region("APP_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")),
            calls_stream=env.name("CALLSTREAM_CALLS_STREAM", "callstream-calls"),
            audio_stream=env.name("CALLSTREAM_AUDIO_STREAM", "callstream-audio"),
            transcripts_stream=env.name("CALLSTREAM_TRANSCRIPTS_STREAM", "callstream-transcripts"),
            deadletter_stream=env.name("CALLSTREAM_DEADLETTER_STREAM", "callstream-deadletters"),
            lease_table=env.name("CALLSTREAM_LEASE_TABLE", "callstream-leases"),
            worker_id=env.text("CALLSTREAM_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}"),
            poll_interval_ms=env.integer("CALLSTREAM_POLL_INTERVAL_MS", 200, minimum=10),
            progress_table=env.name("CALLSTREAM_PROGRESS_TABLE", "callstream-progress"),
            writer_pins=writer_pins(env),
            publish_deadline_s=env.integer("CALLSTREAM_PUBLISH_DEADLINE_MS", 120_000, 0, 3_600_000)
            / 1000,
            read_mode=env.choice("CALLSTREAM_READ_MODE", "polling", READ_MODES),
            poll_groups=env.integer("CALLSTREAM_POLL_GROUPS", 0, minimum=0, maximum=20),
            efo_consumer_arn=consumer_arn(env),
            efo_consumer_name=_optional_name(env, "CALLSTREAM_EFO_CONSUMER_NAME"),
        )

    def polling_groups(self, stream: str) -> int:
        """How many consumer groups poll each shard of `stream` (they share its 5 GetRecords
        per second): CALLSTREAM_POLL_GROUPS, else the readers this project gives the stream."""
        if self.poll_groups:
            return self.poll_groups
        usual = {
            self.calls_stream: 2,  # ingest, live view
            self.audio_stream: 2,  # transcriber, recorder
            self.transcripts_stream: 3,  # persister, sentiment, live view
        }
        return usual.get(stream, 1)


READ_MODES = ("polling", "efo")
_CONSUMER_ARN = re.compile(
    r"^arn:aws[a-z-]*:kinesis:[a-z0-9-]+:\d{12}:stream/[A-Za-z0-9_.-]+/consumer/[A-Za-z0-9_.-]+:\d+$"
)


def consumer_arn(env: Env) -> str:
    """CALLSTREAM_EFO_CONSUMER_ARN: empty, or a Kinesis stream consumer's ARN."""
    arn = env.text("CALLSTREAM_EFO_CONSUMER_ARN", "-")
    if arn == "-":
        return ""
    if not _CONSUMER_ARN.match(arn):
        raise ConfigError(
            "CALLSTREAM_EFO_CONSUMER_ARN must be a Kinesis stream consumer ARN "
            f"(arn:aws:kinesis:<region>:<account>:stream/<stream>/consumer/<name>:<n>), got {arn!r}"
        )
    return arn


def _optional_name(env: Env, name: str) -> str:
    value = env.text(name, "-")
    return "" if value == "-" else env.name(name, value)


def writer_pins(env: Env) -> tuple[tuple[str, int], ...]:
    """CALLSTREAM_WRITER_SCHEMAS, each pin checked to name a schema file that exists.

    `default_contract()` applies the same variable; reading it here too makes a
    bad pin stop the service at start-up, with the settings' other errors."""
    # contract.py reads its pins through this module: imported here, not at the top.
    from callstream.contract import Contract

    pins = env.pins(WRITER_SCHEMAS)
    if pins:
        try:
            Contract(pins=pins)
        except ConfigError as e:
            raise ConfigError(f"{WRITER_SCHEMAS}: {e}") from e
    return tuple(sorted(pins.items()))


def recordings_stream(env: Env) -> str:
    """CALLSTREAM_RECORDINGS_STREAM: the stream RecordingStored goes to (recorder, live view)."""
    return env.name("CALLSTREAM_RECORDINGS_STREAM", "callstream-recordings")
