"""The capacity and cost model's arithmetic (`callstream capacity`)."""

from __future__ import annotations

import json
import math

import pytest

from callstream.cli import main
from callstream.cli.capacity import (
    AUDIO_RECORD_BYTES,
    AUDIO_RECORDS_PER_CALL_S,
    MIB,
    PRICES,
    Inputs,
    calls_per_shard,
    plan,
    shards_needed,
)

PER_CALL_BYTES = AUDIO_RECORDS_PER_CALL_S * AUDIO_RECORD_BYTES  # 34,343.75 B/s


def _usd(name: str) -> float:
    price = PRICES[name].usd
    assert price is not None
    return price


def test_a_call_writes_sixteen_records_and_about_33_kib_a_second() -> None:
    assert AUDIO_RECORDS_PER_CALL_S == 15.625
    assert round(PER_CALL_BYTES / 1024, 1) == 33.5


@pytest.mark.parametrize(
    ("groups", "mode", "calls"),
    [
        (1, "polling", MIB / PER_CALL_BYTES),  # writes bind: 30.5
        (2, "polling", MIB / PER_CALL_BYTES),  # 2 MiB shared by 2 = the write quota
        (4, "polling", 2 * MIB / (4 * PER_CALL_BYTES)),  # 15.3: the shared reads bind
        (4, "efo", MIB / PER_CALL_BYTES),  # each consumer its own 2 MiB/s
        (20, "efo", MIB / PER_CALL_BYTES),
    ],
)
def test_calls_per_shard_follow_the_binding_quota(groups: int, mode: str, calls: float) -> None:
    assert calls_per_shard(groups, mode) == pytest.approx(calls)


def test_records_never_bind_before_bytes_for_audio() -> None:
    assert 1000 / AUDIO_RECORDS_PER_CALL_S > MIB / PER_CALL_BYTES  # 64 calls vs 30.5


def test_shards_needed_take_the_largest_need_at_the_headroom() -> None:
    assert shards_needed(100, 1.5 * MIB, 1, "polling", headroom=1.0) == (2, "write MiB/s")
    assert shards_needed(2500, 1000, 1, "efo", headroom=1.0) == (3, "write records/s")
    assert shards_needed(10, 0.6 * MIB, 4, "polling", headroom=1.0) == (2, "shared read MiB/s")
    assert shards_needed(10, 0.6 * MIB, 4, "efo", headroom=1.0)[0] == 1
    assert shards_needed(0, 0, 3, "polling") == (1, "write MiB/s")  # never zero
    assert shards_needed(10, 0.9 * MIB, 1, "efo", headroom=0.8)[0] == 2


def test_a_thousand_calls_with_fan_out() -> None:
    p = plan(Inputs(calls=1000, read_mode="efo"))
    calls, audio, transcripts = p.streams
    assert audio.shards == math.ceil(1000 * PER_CALL_BYTES / (0.8 * MIB)) == 41
    assert audio.bound_by == "write MiB/s"
    assert audio.records_per_shard_s == pytest.approx(15625 / 41)
    assert calls.shards == 1 and transcripts.shards == 2
    shard_hours = (1 + 41 + 2 + 2) * _usd("shard_hour")  # + dead letters, recordings
    assert p.cost_per_hour["kinesis shard-hours"] == pytest.approx(shard_hours)
    consumer_shards = 2 * 41 + 3 * 2
    assert p.cost_per_hour["fan-out consumer-shard-hours"] == pytest.approx(
        consumer_shards * _usd("efo_consumer_shard_hour")
    )


def test_polling_with_four_groups_needs_twice_the_audio_shards() -> None:
    two = plan(Inputs(calls=1000, audio_consumers=2, read_mode="polling")).streams[1]
    four = plan(Inputs(calls=1000, audio_consumers=4, read_mode="polling")).streams[1]
    assert (two.shards, four.shards) == (41, 82)
    assert four.bound_by == "shared read MiB/s"
    assert "fan-out data" not in plan(Inputs(calls=10)).cost_per_hour


def test_put_payload_units_count_one_per_small_record() -> None:
    p = plan(Inputs(calls=100))
    records = sum(s.records_per_s for s in p.streams)
    expected = records * 3600 / 1e6 * _usd("put_payload_units")
    assert p.cost_per_hour["kinesis PUT payload units"] == pytest.approx(expected)


def test_lease_writes_are_renewals_and_at_most_one_checkpoint_per_shard_and_group() -> None:
    p = plan(Inputs(calls=100, audio_consumers=2, transcript_consumers=3))
    shard_groups = sum(s.shards * s.groups for s in p.streams)
    assert p.lease_writes_per_s == pytest.approx(shard_groups * (0.3 + 1.0))
    assert p.lease_reads_per_s == pytest.approx(shard_groups * 0.3)


def test_stereo_halves_the_transcribe_minutes_and_an_unknown_price_stays_unknown() -> None:
    per_track = plan(Inputs(calls=10, engine="transcribe", transcribe_usd_per_minute=0.02))
    stereo = plan(
        Inputs(calls=10, engine="transcribe", channel_mode="stereo", transcribe_usd_per_minute=0.02)
    )
    assert per_track.cost_per_hour["amazon transcribe"] == pytest.approx(10 * 60 * 2 * 0.02)
    assert stereo.cost_per_hour["amazon transcribe"] == pytest.approx(10 * 60 * 0.02)
    unknown = plan(Inputs(calls=10, engine="transcribe"))
    assert unknown.cost_per_hour["amazon transcribe"] is None
    assert unknown.cost_per_call_hour()["amazon transcribe"] is None


def test_offline_transcribers_follow_six_tracks_per_vcpu_and_ingest_two_hundred_calls() -> None:
    tasks = plan(Inputs(calls=1000)).tasks
    assert tasks["transcriber"] == math.ceil(2000 / 6)
    assert tasks["ingest"] == 5


def test_every_price_is_dated_with_its_source() -> None:
    for name, price in PRICES.items():
        assert price.source.startswith("https://aws.amazon.com/"), name
        assert price.usd is None or price.usd > 0


def test_the_command_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["capacity", "--calls", "1000", "--audio-consumers", "2"]
    assert main([*argv, "--transcript-consumers", "3", "--read-mode", "efo"]) == 0
    out = capsys.readouterr().out
    assert "audio             41" in out and "cost per call-hour" in out
    assert main(["capacity", "--calls", "30", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["streams"][1]["shards"] == 2  # 30 calls at 80 %
    assert data["prices"]["shard_hour"]["read_on"] == "2026-12-05"
    assert main(["capacity", "--calls", "0"]) == 2
