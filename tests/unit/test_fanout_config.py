"""Read mode by configuration: CALLSTREAM_READ_MODE and friends, and the source each picks."""

from __future__ import annotations

from typing import Any

import pytest

from callstream.bus.consumer import KinesisSource
from callstream.bus.fanout import FanOutReader, FanOutSource
from callstream.bus.leases import LeaseTable
from callstream.bus.polling import PollingReader
from callstream.config import BusSettings, Env
from callstream.errors import ConfigError
from callstream.metrics import Metrics
from callstream.service import record_source

ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/callstream-audio/consumer/transcriber:17"


def _bus(**env: str) -> BusSettings:
    return BusSettings.from_env(Env({"APP_REGION": "us-east-1", **env}))


def _source(bus: BusSettings, stream: str, service: str = "recorder") -> KinesisSource:
    return record_source(
        service,
        bus,
        stream,
        LeaseTable(None, "leases"),
        lease_ms=10_000,
        on_shard_lost=lambda shard: None,
        metrics=Metrics(service, "off"),
    )


def test_polling_is_the_default_read_mode() -> None:
    bus = _bus()
    assert (bus.read_mode, bus.poll_groups, bus.efo_consumer_arn) == ("polling", 0, "")


@pytest.mark.parametrize(
    ("stream", "groups"),
    [("callstream-calls", 2), ("callstream-audio", 2), ("callstream-transcripts", 3), ("x", 1)],
)
def test_each_stream_defaults_to_the_groups_that_read_it(stream: str, groups: int) -> None:
    assert _bus().polling_groups(stream) == groups


def test_poll_groups_overrides_the_default() -> None:
    assert _bus(CALLSTREAM_POLL_GROUPS="4").polling_groups("callstream-audio") == 4


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CALLSTREAM_READ_MODE", "push", "CALLSTREAM_READ_MODE must be one of polling, efo"),
        ("CALLSTREAM_POLL_GROUPS", "30", "CALLSTREAM_POLL_GROUPS must be between 0 and 20"),
        ("CALLSTREAM_EFO_CONSUMER_ARN", "transcriber", "must be a Kinesis stream consumer ARN"),
        ("CALLSTREAM_EFO_CONSUMER_NAME", "a b", "CALLSTREAM_EFO_CONSUMER_NAME must be"),
    ],
)
def test_bad_read_settings_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _bus(**{name: value})


def test_read_mode_is_case_insensitive_and_the_arn_is_kept() -> None:
    bus = _bus(CALLSTREAM_READ_MODE="EFO", CALLSTREAM_EFO_CONSUMER_ARN=ARN)
    assert (bus.read_mode, bus.efo_consumer_arn) == ("efo", ARN)


def test_polling_reads_each_shard_at_the_groups_share_of_its_budget() -> None:
    source = _source(_bus(), "callstream-audio")
    assert type(source) is KinesisSource
    reader: Any = source.reader
    assert isinstance(reader, PollingReader)
    assert reader.interval_s == pytest.approx(0.4)  # transcriber and recorder: 2 of 5 reads/s
    assert source.checkpoint_interval_s == 1.0  # lease-table writes: at most 1/s per shard
    four = _source(_bus(CALLSTREAM_POLL_GROUPS="4"), "callstream-audio").reader
    assert isinstance(four, PollingReader) and four.interval_s == pytest.approx(0.8)
    slow = _source(_bus(CALLSTREAM_POLL_INTERVAL_MS="1000"), "callstream-audio").reader
    assert isinstance(slow, PollingReader) and slow.interval_s == pytest.approx(1.0)


def test_efo_reads_through_the_configured_consumer() -> None:
    bus = _bus(CALLSTREAM_READ_MODE="efo", CALLSTREAM_EFO_CONSUMER_ARN=ARN)
    source = _source(bus, "callstream-audio", "transcriber")
    assert isinstance(source, FanOutSource)
    assert isinstance(source.reader, FanOutReader) and source.reader.consumer_arn == ARN
    assert source.prefix == "transcriber/callstream-audio/"  # the same lease table items


def test_efo_without_an_arn_registers_the_consumer_named_for_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registered: list[tuple[str, str]] = []

    def register(kinesis: Any, stream: str, name: str) -> str:
        registered.append((stream, name))
        return ARN

    monkeypatch.setattr("callstream.service.register_consumer", register)
    _source(_bus(CALLSTREAM_READ_MODE="efo"), "callstream-audio", "transcriber")
    _source(
        _bus(CALLSTREAM_READ_MODE="efo", CALLSTREAM_EFO_CONSUMER_NAME="tx-blue"),
        "callstream-audio",
        "transcriber",
    )
    assert registered == [("callstream-audio", "transcriber"), ("callstream-audio", "tx-blue")]
