"""The transcriber's own settings: Amazon Transcribe options, recovery and decoding threads.

Read from `CALLSTREAM_TRANSCRIBE_*` variables once at start-up; a bad value is a
`ConfigError` naming the variable. The shared settings (bus, engine choice,
region, default language) are `TranscriberSettings`; `check_engine_options` refuses
options the chosen engine would ignore.

`CALLSTREAM_TRANSCRIBE_CHANNEL_MODE` says how calls map to Amazon Transcribe
streams: `per-track` (the default) opens one stream per track; `stereo` opens
one 2-channel stream per call with channel identification (customer on
channel 0, agent on channel 1; `callstream.asr.stereo`), which halves the
streams counted against the account's concurrent-stream quota. A track's
audio then waits up to `CALLSTREAM_TRANSCRIBE_STEREO_MAX_LAG_MS` (default
1000) for the other track's before the other is padded with silence.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callstream.config import BusSettings, Env
from callstream.errors import ConfigError
from services.transcriber.recovery import RecoveryPolicy

P = "CALLSTREAM_TRANSCRIBE_"
_PII_MODES = ("off", "identify", "redact")
CHANNEL_MODES = ("per-track", "stereo")
_MIN_REJOIN_WAIT_S = 30.0


@dataclass(frozen=True)
class TranscriberSettings:
    """The transcriber service: which speech engine, where."""

    bus: BusSettings
    engine: str
    transcribe_region: str
    default_language: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TranscriberSettings:
        """Validate the transcriber's environment."""
        env = Env(environ)
        bus = BusSettings.from_env(env)
        return cls(
            bus=bus,
            engine=env.choice("CALLSTREAM_ASR_ENGINE", "offline", ("offline", "transcribe")),
            transcribe_region=env.region("TRANSCRIBE_REGION", bus.region),
            default_language=env.text("CALLSTREAM_DEFAULT_LANGUAGE", "en-US"),
        )


def check_engine_options(settings: TranscriberSettings, options: TranscribeOptions) -> None:
    """Refuse options the chosen engine would silently ignore."""
    if options.channel_mode == "stereo" and settings.engine != "transcribe":
        raise ConfigError(
            "CALLSTREAM_TRANSCRIBE_CHANNEL_MODE=stereo needs CALLSTREAM_ASR_ENGINE=transcribe, "
            f"got {settings.engine!r}"
        )


def recovery_policy(settings: TranscriberSettings, options: TranscribeOptions) -> RecoveryPolicy:
    """The options' recovery policy, with no idle limit for the offline engine."""
    if settings.engine == "transcribe":
        return options.policy
    # No idle limit offline, and silence inserted mid-utterance would split it
    # differently from a replay of the same audio.
    return dataclasses.replace(options.policy, keepalive_after_s=None)


@dataclass(frozen=True)
class TranscribeOptions:
    """Amazon Transcribe request options, the recovery policy and offline decoding threads."""

    endpoint_url: str | None
    vocabulary_name: str | None
    vocabulary_filter_name: str | None
    vocabulary_filter_method: str | None
    partial_results_stability: str | None
    pii_mode: str
    pii_entity_types: tuple[str, ...]
    policy: RecoveryPolicy
    workers: int
    channel_mode: str = "per-track"
    stereo_max_lag_ms: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TranscribeOptions:
        """Validate the `CALLSTREAM_TRANSCRIBE_*` variables."""
        raw = os.environ if environ is None else environ
        env = Env(raw)
        options = cls(
            endpoint_url=_endpoint(raw.get(P + "ENDPOINT_URL") or None),
            vocabulary_name=raw.get(P + "VOCABULARY_NAME") or None,
            vocabulary_filter_name=raw.get(P + "VOCABULARY_FILTER_NAME") or None,
            vocabulary_filter_method=_optional_choice(
                env, raw, "VOCABULARY_FILTER_METHOD", ("remove", "mask", "tag")
            ),
            partial_results_stability=_optional_choice(
                env, raw, "PARTIAL_STABILITY", ("low", "medium", "high")
            ),
            pii_mode=env.choice(P + "PII", "off", _PII_MODES),
            pii_entity_types=_names(raw.get(P + "PII_ENTITY_TYPES", "")),
            policy=_policy(env),
            workers=env.integer(P + "WORKERS", max(1, os.cpu_count() or 1), 1, 64),
            channel_mode=env.choice(P + "CHANNEL_MODE", "per-track", CHANNEL_MODES),
            stereo_max_lag_ms=env.integer(P + "STEREO_MAX_LAG_MS", 1000, 100, 10_000),
        )
        options._check()
        return options

    def _check(self) -> None:
        if self.vocabulary_filter_method and not self.vocabulary_filter_name:
            raise ConfigError(
                f"{P}VOCABULARY_FILTER_METHOD needs {P}VOCABULARY_FILTER_NAME to be set"
            )
        if self.pii_entity_types and self.pii_mode == "off":
            raise ConfigError(f"{P}PII_ENTITY_TYPES needs {P}PII=identify or redact")

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `TranscribeEngine`, besides region and language."""
        return {
            "endpoint_url": self.endpoint_url,
            "vocabulary_name": self.vocabulary_name,
            "vocabulary_filter_name": self.vocabulary_filter_name,
            "vocabulary_filter_method": self.vocabulary_filter_method,
            "partial_results_stability": self.partial_results_stability,
            "pii_entity_types": self.pii_entity_types,
            "content_redaction_type": "PII" if self.pii_mode == "redact" else None,
            "content_identification_type": "PII" if self.pii_mode == "identify" else None,
        }

    def stereo_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `StereoTranscribeEngine`, besides the wrapped engine."""
        # A reopened track waits for the other, whose backoff may be up to half the
        # cap longer (equal jitter), so the wait follows the backoff cap.
        return {
            "max_lag_ms": self.stereo_max_lag_ms,
            "rejoin_wait_s": max(_MIN_REJOIN_WAIT_S, self.policy.backoff_max_s),
        }


def _policy(env: Env) -> RecoveryPolicy:
    return RecoveryPolicy(
        max_retries=env.integer(P + "MAX_RETRIES", 8, 1, 100),
        backoff_base_s=env.integer(P + "BACKOFF_MS", 250, 1, 60_000) / 1000,
        backoff_max_s=env.integer(P + "BACKOFF_MAX_MS", 20_000, 1, 600_000) / 1000,
        resend_limit_ms=env.integer(P + "RESEND_LIMIT_S", 300, 10, 3600) * 1000,
        keepalive_after_s=env.integer(P + "KEEPALIVE_AFTER_MS", 5_000, 100, 14_000) / 1000,
        rollover_ms=env.integer(P + "ROLLOVER_S", 14_100, 60, 14_340) * 1000,
    )


def _endpoint(value: str | None) -> str | None:
    if value is not None and not value.startswith("https://"):
        raise ConfigError(
            f"{P}ENDPOINT_URL must be an https:// URL (HTTP/2 needs TLS), got {value!r}"
        )
    return value


def _optional_choice(
    env: Env, raw: Mapping[str, str], name: str, choices: tuple[str, ...]
) -> str | None:
    if not raw.get(P + name):
        return None
    return env.choice(P + name, choices[0], choices)


def _names(value: str) -> tuple[str, ...]:
    names = tuple(part.strip().upper() for part in value.split(",") if part.strip())
    for name in names:
        if not name.replace("_", "").isalnum():
            raise ConfigError(f"{P}PII_ENTITY_TYPES must be comma-separated names, got {value!r}")
    return names
