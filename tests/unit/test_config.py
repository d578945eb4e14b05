"""Settings: the reference's variables keep their meaning; bad values name the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from callstream.errors import ConfigError
from services.ingest.settings import IngestSettings
from services.persister.settings import PersisterSettings
from services.recorder.settings import RecorderSettings
from services.transcriber.settings import TranscriberSettings


def test_reference_variables_keep_their_meaning() -> None:
    env = {
        "APP_REGION": "eu-west-2",
        "TRANSCRIBE_REGION": "us-west-2",
        "RECORDINGS_BUCKET_NAME": "my-recordings",
        "RECORDINGS_KEY_PREFIX": "calls/",
        "RECORDINGS_PUBLIC_READ_ACL": "TRUE",
        "TABLE_CALLER_TRANSCRIPT": "fromCustomer",
        "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER": "toCustomer",
        "SAVE_PARTIAL_TRANSCRIPTS": "true",
        "CONSOLE_LOG_TRANSCRIPT_FLAG": "FALSE",
    }
    recorder = RecorderSettings.from_env(env)
    assert (recorder.bucket, recorder.key_prefix, recorder.public_read) == (
        "my-recordings",
        "calls/",
        True,
    )
    assert recorder.bus.region == "eu-west-2"
    persister = PersisterSettings.from_env(env)
    assert (persister.customer_table, persister.agent_table) == ("fromCustomer", "toCustomer")
    assert persister.save_partials and not persister.console_log
    assert TranscriberSettings.from_env(env).transcribe_region == "us-west-2"


def test_a_publish_gives_up_after_two_minutes_unless_configured() -> None:
    assert TranscriberSettings.from_env({}).bus.publish_deadline_s == 120.0
    env = {"CALLSTREAM_PUBLISH_DEADLINE_MS": "250"}
    assert TranscriberSettings.from_env(env).bus.publish_deadline_s == 0.25


def test_public_read_is_off_by_default() -> None:
    assert RecorderSettings.from_env({"RECORDINGS_BUCKET_NAME": "b-1"}).public_read is False


@pytest.mark.parametrize(
    "factory,env,variable",
    [
        (RecorderSettings.from_env, {}, "RECORDINGS_BUCKET_NAME"),
        (
            RecorderSettings.from_env,
            {"RECORDINGS_BUCKET_NAME": "Bad_Bucket"},
            "RECORDINGS_BUCKET_NAME",
        ),
        (
            PersisterSettings.from_env,
            {"SAVE_PARTIAL_TRANSCRIPTS": "maybe"},
            "SAVE_PARTIAL_TRANSCRIPTS",
        ),
        (PersisterSettings.from_env, {"APP_REGION": "moon-1"}, "APP_REGION"),
        (IngestSettings.from_env, {"CALLSTREAM_CHUNK_MS": "5"}, "CALLSTREAM_CHUNK_MS"),
        (IngestSettings.from_env, {"START_SELECTOR_TYPE": "EARLIEST"}, "START_SELECTOR_TYPE"),
        (TranscriberSettings.from_env, {"CALLSTREAM_ASR_ENGINE": "siri"}, "CALLSTREAM_ASR_ENGINE"),
        (
            TranscriberSettings.from_env,
            {"CALLSTREAM_PUBLISH_DEADLINE_MS": "-1"},
            "CALLSTREAM_PUBLISH_DEADLINE_MS",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(factory, env, variable) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=variable):
        factory(env)


def test_a_service_with_a_bad_value_stops_at_start_up_with_the_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.recorder.main"],
        env={"PATH": "/usr/bin:/bin", "RECORDINGS_BUCKET_NAME": "Not A Bucket"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "RECORDINGS_BUCKET_NAME" in result.stderr
