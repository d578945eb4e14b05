"""`callstream capacity`'s per-shard prediction against what bench/bus_quota.py measures.

A small trial of the benchmark's machinery (3 real-time calls on one shard,
two consumer groups, the emulator's quotas on): the shard's own usage
counters must show the records and bytes per second the model predicts for
those calls, the reads its read mode implies, and no throttle.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from callstream.cli.capacity import MIB, READ_CALLS_PER_S, Inputs, plan
from callstream_emulator.emulator import Emulator

pytestmark = pytest.mark.integration
BENCH = Path(__file__).resolve().parents[2] / "bench" / "bus_quota.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bus_quota", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bus_quota"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["polling", "efo"])
def test_one_shard_carries_what_the_model_predicts_for_three_calls(
    emulator: Emulator, aws_env: dict[str, str], mode: str
) -> None:
    assert emulator.quotas.enabled
    trial = _bench().run_trial(aws_env, calls=3, groups=2, mode=mode, seconds=6, warmup_s=2)
    (audio,) = [s for s in plan(Inputs(calls=3, read_mode=mode)).streams if s.name == "audio"]
    assert audio.shards == 1
    carried = trial.per_shard_s
    assert carried["records_written"] == pytest.approx(audio.records_per_shard_s, rel=0.08)
    assert carried["bytes_written"] / MIB == pytest.approx(audio.mib_per_shard_s, rel=0.08)
    out = carried["bytes_pushed"] if mode == "efo" else carried["bytes_read"]
    assert out == pytest.approx(2 * carried["bytes_written"], rel=0.15)  # each group, once
    if mode == "polling":  # 2 groups share the shard's 5 reads/s: 2.5 each
        # Counted over a 6 s window, each group may land one read on each edge of it:
        # 2 x (6 / 0.4 + 1) = 32 reads, 5.33/s, with none over the quota.
        assert carried["get_records_calls"] <= READ_CALLS_PER_S + 2 / 6
    else:
        assert carried["get_records_calls"] == 0
    assert trial.kept_up and not any(trial.throttles.values()), trial
