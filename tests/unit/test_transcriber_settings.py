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
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        TranscribeOptions.from_env(env)
