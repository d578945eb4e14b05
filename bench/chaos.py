"""Benchmark: the chaos round of tests/e2e/test_chaos.py at a larger size.

Stand-alone: ``.venv/bin/python bench/chaos.py [--calls 60] [--transcribed 4]
[--kills 15] [--instances 3] [--seed 4] [--combined --freezes 3]`` (several
minutes). `--combined` also throttles 20 % of Kinesis (partial PutRecords),
DynamoDB and S3 requests and gives the transcribers a publish deadline of 0
(their first refusal fails the publish, which is then retried from the
outbox); `--freezes` SIGSTOPs instances past their lease. Starts the
embedded emulator and `--instances` processes of every service, plays the
transcribed calls undisturbed for reference rows, then plays every call while
SIGKILLing a random instance of each service in turn, and prints what was
killed, how long the round took, and any WAV, row or dead-letter mismatch, and
any chunk, CallStarted or CallEnded repeated on the audio stream.
Exit code 1 if anything was lost or duplicated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from callstream_emulator.emulator import CLEARED_ENV, Emulator
from callstream_emulator.processes import ServiceGroup

REPO = Path(__file__).resolve().parents[1]


def _harness() -> ModuleType:
    """tests/e2e/test_chaos.py by path (a site-packages `tests` package shadows ours)."""
    spec = importlib.util.spec_from_file_location("chaos_harness", REPO / "tests/e2e/test_chaos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_harness"] = module
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    """One large chaos round; 0 when the outputs equal an undisturbed run's."""
    h = _harness()
    workdir = Path(tempfile.mkdtemp(prefix="chaos-bench-"))
    with Emulator() as emulator:
        env = h.chaos_env(emulator.env(), workdir, f"bench{args.seed}")
        for name in CLEARED_ENV:
            os.environ.pop(name, None)
        os.environ.update(env)
        h.provision_chaos(env, shards=args.shards)
        overrides = {"transcriber": {"CALLSTREAM_PUBLISH_DEADLINE_MS": "0"}}
        group = ServiceGroup(env, workdir / "logs", overrides if args.combined else None)
        group.start(instances=args.instances)
        try:
            reference = h.undisturbed_rows(
                env,
                h.make_calls(random.Random(args.seed), args.calls, args.transcribed, 6.0, "ref"),
            )
            calls = h.make_calls(
                random.Random(args.seed), args.calls, args.transcribed, 6.0, f"b{args.seed}"
            )
            if args.combined:
                _throttle_everything(emulator, args.seed)
            result = h.play_round(
                env,
                group,
                calls,
                reference,
                rng=random.Random(args.seed + 1),
                kills=args.kills,
                every_s=args.every_s,
                timeout_s=600,
                freezes=args.freezes,
                frozen_s=4.5,  # past the 3 s lease
            )
            emulator.faults.clear()
            h.wait_until(lambda: not h.lagging_checkpoints(env), 120)
            lagging = h.lagging_checkpoints(env)
        finally:
            group.stop()
        repeated = h.repeated_audio(env, {c.contact_id for c in calls})
        repeated_transcripts = h.repeated_transcripts(env, {c.contact_id for c in calls})
        failed = h.failed_publishes(group)
    print(f"calls {args.calls} ({args.transcribed} transcribed), instances {args.instances}")
    if args.combined:
        print("combined: 20% of Kinesis (partial PutRecords), DynamoDB (partial batch writes)")
        print(f"and S3 requests throttled; transcriber publishes failed and retried: {failed}")
    print(f"killed/froze {len(result.kills)}: {result.kills}")
    print(f"round took {result.seconds} s; logs in {workdir / 'logs'}")
    print(f"WAV mismatches: {result.wav_mismatches or 'none'}")
    print(f"row mismatches: {json.dumps(result.row_mismatches, default=str) or 'none'}")
    print(f"dead letters: {result.dead_letters or 'none'}")
    print(f"repeated on the audio stream (contact, track, sequence): {repeated or 'none'}")
    print(f"records repeated on the transcripts stream: {repeated_transcripts}")
    print(f"checkpoints short of the stream's end: {lagging or 'none'}")
    lost = result.wav_mismatches or result.row_mismatches or result.dead_letters or lagging
    if not args.combined:  # throttled publishes may repeat a record: counted, not a loss
        lost = lost or repeated
    return 1 if lost else 0


def _throttle_everything(emulator: Emulator, seed: int) -> None:
    emulator.faults.throttle_kinesis(0.2, seed=seed, partial_put_records=True)
    emulator.faults.throttle_dynamodb(0.2, seed=seed, partial_batch_writes=True)
    emulator.faults.throttle_s3(0.2, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--transcribed", type=int, default=4)
    parser.add_argument("--kills", type=int, default=15)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--freezes", type=int, default=0, help="SIGSTOPs past the lease")
    parser.add_argument(
        "--combined",
        action="store_true",
        help="throttle Kinesis, DynamoDB and S3 and fail transcriber publishes too",
    )
    raise SystemExit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
