"""The transcriber's `CALLSTREAM_TRANSCRIBE_*` settings: defaults, engine options, errors."""

from __future__ import annotations

import pytest

from callstream.errors import ConfigError
from services.transcriber.settings import TranscribeOptions


def test_defaults_need_no_variable() -> None:
    options = TranscribeOptions.from_env({})
    assert options.endpoint_url is None and options.pii_mode == "off"
    assert options.policy.keepalive_after_s == 5.0 and options.policy.rollover_ms == 14_100_000
    assert options.workers >= 1
    assert options.engine_kwargs()["content_redaction_type"] is None
    assert options.channel_mode == "per-track"


def test_stereo_channel_mode_and_its_tuning_reach_the_stereo_engine() -> None:
    options = TranscribeOptions.from_env(
        {
            "CALLSTREAM_TRANSCRIBE_CHANNEL_MODE": "STEREO",
            "CALLSTREAM_TRANSCRIBE_STEREO_MAX_LAG_MS": "500",
            "CALLSTREAM_TRANSCRIBE_BACKOFF_MAX_MS": "60000",
        }
    )
    assert options.channel_mode == "stereo"
    # The wait for a reopening track covers the other track's longer backoff.
    assert options.stereo_kwargs() == {"max_lag_ms": 500, "rejoin_wait_s": 60.0}
    assert TranscribeOptions.from_env({}).stereo_kwargs()["rejoin_wait_s"] == 30.0


def test_make_engine_wraps_transcribe_in_the_stereo_engine_only_in_stereo_mode() -> None:
    from callstream.asr.transcribe.engine import TranscribeEngine
    from callstream.asr.transcribe.stereo import StereoTranscribeEngine
    from services.transcriber.adapters import make_engine
    from services.transcriber.settings import TranscriberSettings

    settings = TranscriberSettings.from_env({"CALLSTREAM_ASR_ENGINE": "transcribe"})
    for mode, kind in (("stereo", StereoTranscribeEngine), ("per-track", TranscribeEngine)):
        options = TranscribeOptions.from_env({"CALLSTREAM_TRANSCRIBE_CHANNEL_MODE": mode})
        engine = make_engine(settings, options)
        try:
            assert isinstance(engine, kind)
        finally:
            engine.close()


def test_options_reach_the_engine_arguments() -> None:
    options = TranscribeOptions.from_env(
        {
            "CALLSTREAM_TRANSCRIBE_ENDPOINT_URL": "https://127.0.0.1:8443",
            "CALLSTREAM_TRANSCRIBE_VOCABULARY_NAME": "products",
            "CALLSTREAM_TRANSCRIBE_VOCABULARY_FILTER_NAME": "rude",
            "CALLSTREAM_TRANSCRIBE_VOCABULARY_FILTER_METHOD": "mask",
            "CALLSTREAM_TRANSCRIBE_PARTIAL_STABILITY": "high",
            "CALLSTREAM_TRANSCRIBE_PII": "redact",
            "CALLSTREAM_TRANSCRIBE_PII_ENTITY_TYPES": "name, ssn",
            "CALLSTREAM_TRANSCRIBE_BACKOFF_MS": "100",
            "CALLSTREAM_TRANSCRIBE_WORKERS": "3",
        }
    )
    kwargs = options.engine_kwargs()
    assert kwargs["endpoint_url"] == "https://127.0.0.1:8443"
    assert kwargs["vocabulary_filter_method"] == "mask"
    assert kwargs["partial_results_stability"] == "high"
    assert kwargs["content_redaction_type"] == "PII"
    assert kwargs["content_identification_type"] is None
    assert kwargs["pii_entity_types"] == ("NAME", "SSN")
    assert options.policy.backoff_base_s == 0.1 and options.workers == 3


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CALLSTREAM_TRANSCRIBE_ENDPOINT_URL": "http://x"}, "CALLSTREAM_TRANSCRIBE_ENDPOINT_URL"),
        (
            {"CALLSTREAM_TRANSCRIBE_PARTIAL_STABILITY": "max"},
            "CALLSTREAM_TRANSCRIBE_PARTIAL_STABILITY",
        ),
        ({"CALLSTREAM_TRANSCRIBE_PII": "hide"}, "CALLSTREAM_TRANSCRIBE_PII"),
        (
            {"CALLSTREAM_TRANSCRIBE_PII_ENTITY_TYPES": "NAME"},
            "CALLSTREAM_TRANSCRIBE_PII_ENTITY_TYPES",
        ),
        (
            {"CALLSTREAM_TRANSCRIBE_VOCABULARY_FILTER_METHOD": "mask"},
            "CALLSTREAM_TRANSCRIBE_VOCABULARY_FILTER_METHOD",
        ),
        ({"CALLSTREAM_TRANSCRIBE_WORKERS": "0"}, "CALLSTREAM_TRANSCRIBE_WORKERS"),
        ({"CALLSTREAM_TRANSCRIBE_ROLLOVER_S": "20000"}, "CALLSTREAM_TRANSCRIBE_ROLLOVER_S"),
        ({"CALLSTREAM_TRANSCRIBE_CHANNEL_MODE": "mono"}, "CALLSTREAM_TRANSCRIBE_CHANNEL_MODE"),
        (
            {"CALLSTREAM_TRANSCRIBE_STEREO_MAX_LAG_MS": "50"},
            "CALLSTREAM_TRANSCRIBE_STEREO_MAX_LAG_MS",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        TranscribeOptions.from_env(env)


def test_stereo_with_the_offline_engine_is_refused_at_start_up() -> None:
    from services.transcriber.settings import TranscriberSettings, check_engine_options

    options = TranscribeOptions.from_env({"CALLSTREAM_TRANSCRIBE_CHANNEL_MODE": "stereo"})
    offline = TranscriberSettings.from_env({"CALLSTREAM_ASR_ENGINE": "offline"})
    with pytest.raises(ConfigError, match="CALLSTREAM_ASR_ENGINE=transcribe"):
        check_engine_options(offline, options)
    check_engine_options(
        TranscriberSettings.from_env({"CALLSTREAM_ASR_ENGINE": "transcribe"}), options
    )
