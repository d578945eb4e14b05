"""The recorder's settings: which recordings, where, encrypted with what."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from callstream.config import BusSettings, Env, recordings_stream
from callstream.errors import ConfigError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

MIB = 1024 * 1024


@dataclass(frozen=True)
class RecorderSettings:
    """The recorder service: which recordings, where, encrypted with what (docs/recordings.md)."""

    bus: BusSettings
    bucket: str
    key_prefix: str
    public_read: bool
    spool_dir: str
    formats: tuple[str, ...] = ("stereo",)  # RECORDINGS_FORMAT: stereo, per-track or both
    channel_order: tuple[str, str] = ("AUDIO_FROM_CUSTOMER", "AUDIO_TO_CUSTOMER")  # left, right
    kms_key_id: str | None = None  # None: SSE-KMS with the AWS managed key aws/s3
    part_bytes: int = 5 * MIB  # every part of a streamed upload but the last
    align_horizon_ms: int = 30_000  # how far one track may trail the other before it is silence
    missing_wait_s: int = 60  # how long after CallEnded missing chunks are waited for
    recordings_stream: str = "callstream-recordings"  # where RecordingStored is published
    upload_workers: int = 8  # calls whose S3 steps run at once, off the loop's thread

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RecorderSettings:
        """Validate the recorder's environment."""
        env = Env(environ)
        bucket = env.text("RECORDINGS_BUCKET_NAME")
        if not _BUCKET.match(bucket):
            raise ConfigError(f"RECORDINGS_BUCKET_NAME is not a valid S3 bucket name: {bucket!r}")
        return cls(
            bus=BusSettings.from_env(env),
            bucket=bucket,
            key_prefix=env.text("RECORDINGS_KEY_PREFIX", "recordings/"),
            public_read=env.flag("RECORDINGS_PUBLIC_READ_ACL", False),
            spool_dir=env.text("CALLSTREAM_SPOOL_DIR", os.path.join(".callstream", "spool")),
            formats=_FORMATS[env.choice("RECORDINGS_FORMAT", "stereo", tuple(_FORMATS))],
            channel_order=_channel_order(env),
            kms_key_id=_kms_key(env),
            part_bytes=env.integer("CALLSTREAM_RECORDING_PART_MIB", 5, 5, 5 * 1024) * MIB,
            align_horizon_ms=env.integer("CALLSTREAM_RECORDING_ALIGN_S", 30, 1, 3600) * 1000,
            missing_wait_s=env.integer("CALLSTREAM_RECORDING_WAIT_S", 60, 0, 86_400),
            recordings_stream=recordings_stream(env),
            upload_workers=env.integer("CALLSTREAM_RECORDING_UPLOAD_WORKERS", 8, 0, 64),
        )


_FORMATS = {"stereo": ("stereo",), "per-track": ("per-track",), "both": ("stereo", "per-track")}
_SIDES = {"customer": "AUDIO_FROM_CUSTOMER", "agent": "AUDIO_TO_CUSTOMER"}
_KMS_KEY = re.compile(
    r"^(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key|alias)/[A-Za-z0-9/_+=,.@-]+"
    r"|alias/[A-Za-z0-9/_-]+|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|mrk-[0-9a-f]{32})$"
)


def _channel_order(env: Env) -> tuple[str, str]:
    """RECORDINGS_CHANNEL_ORDER: `customer,agent` (left, right; the default) or `agent,customer`."""
    raw = env.text("RECORDINGS_CHANNEL_ORDER", "customer,agent")
    sides = [_SIDES.get(part.strip().lower(), "") for part in raw.split(",")]
    if len(sides) != 2 or "" in sides or sides[0] == sides[1]:
        raise ConfigError(
            "RECORDINGS_CHANNEL_ORDER must name the left then the right channel: "
            f"customer,agent or agent,customer; got {raw!r}"
        )
    return sides[0], sides[1]


def _kms_key(env: Env) -> str | None:
    """RECORDINGS_KMS_KEY_ID: a key id, key ARN, alias/<name> or alias ARN; unset: aws/s3."""
    raw = env.text("RECORDINGS_KMS_KEY_ID", "-").strip()
    if raw == "-":
        return None
    if not _KMS_KEY.match(raw):
        raise ConfigError(
            "RECORDINGS_KMS_KEY_ID must be a KMS key id, key ARN, alias/<name> or alias ARN, "
            f"got {raw!r}"
        )
    return raw
