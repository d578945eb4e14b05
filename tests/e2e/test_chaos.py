"""Chaos: two instances of every service, SIGKILLed at random during live calls.

Seeded and repeatable (`CALLSTREAM_CHAOS_SEED`, default 4). Every service runs
as two processes sharing the streams' shards through leases (3 s lease, so a
killed instance is taken over within ~4 s). 20 calls, each a different slice
of the sample call, play into the emulator's KVS 4x faster than real time,
started a little apart; meanwhile a random instance of a random service is
SIGKILLed several times and a fresh one started in its place.

Transcription is on for 2 of the 20 calls (the offline engine is the
expensive part on a 2-core machine) and off for the rest. Those 2 calls are
first played undisturbed, under other contact ids, to get the rows of an
undisturbed run.

Asserted afterwards: every call's two WAVs carry exactly the PCM put into
KVS, byte for byte; the transcribed calls' rows equal the undisturbed run's
(same final segments by track, StartTime, EndTime and text; no extra rows);
the dead-letter stream is empty. A second test runs the same pipeline while
the emulator throttles a share of Kinesis, DynamoDB and S3 requests.

`bench/chaos.py` runs the same harness at a larger size.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from callstream import aws
from callstream.bus.kinesis import KinesisPublisher
from callstream.deadletters import list_dead_letters
from callstream.local.demo import SAMPLE_DIR, list_recordings, read_rows
from callstream.local.processes import SERVICES, ServiceGroup, ServiceProcess
from callstream.local.provision import provision
from callstream.local.simulator import CallPlayer, read_wav_pcm
from callstream.service import ensure_stream
from services.ingest.trigger import parse_trigger

pytestmark = pytest.mark.integration
log = logging.getLogger(__name__)

SEED = int(os.environ.get("CALLSTREAM_CHAOS_SEED", "4"))
SPEED = 4.0
BYTES_PER_S = 16_000


@dataclass(frozen=True)
class CallSpec:
    """One simulated call: its contact id, the PCM of each track, transcribed or not."""

    contact_id: str
    customer: bytes
    agent: bytes
    transcribe: bool


@dataclass
class ChaosLog:
    """What the chaos monkey did, for the report."""

    kills: list[tuple[float, str]] = field(default_factory=list)


def chaos_env(emulator_env: dict[str, str], workdir: Path, prefix: str) -> dict[str, str]:
    """The environment of one chaos run: its own streams, tables, bucket and lease table."""
    return {
        **emulator_env,
        "RECORDINGS_BUCKET_NAME": f"{prefix}-recordings",
        "RECORDINGS_KEY_PREFIX": "recordings/",
        "CALLSTREAM_SPOOL_DIR": str(workdir / "spool"),
        "CALLSTREAM_POLL_INTERVAL_MS": "100",
        "CALLSTREAM_LEASE_MS": "3000",
        "CALLSTREAM_CALLS_STREAM": f"{prefix}-calls",
        "CALLSTREAM_AUDIO_STREAM": f"{prefix}-audio",
        "CALLSTREAM_TRANSCRIPTS_STREAM": f"{prefix}-transcripts",
        "CALLSTREAM_DEADLETTER_STREAM": f"{prefix}-deadletters",
        "CALLSTREAM_LEASE_TABLE": f"{prefix}-leases",
        "TABLE_CALLER_TRANSCRIPT": f"{prefix}-customer",
        "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER": f"{prefix}-agent",
    }


def provision_chaos(env: dict[str, str], shards: int = 4) -> None:
    """Streams with several shards each (calls too, so ingest instances share them)."""
    kinesis = aws.client("kinesis", env["APP_REGION"])
    ensure_stream(kinesis, env["CALLSTREAM_CALLS_STREAM"], 2)
    provision(env, audio_shards=shards)


def make_calls(
    rng: random.Random, count: int, transcribed: int, seconds: float, prefix: str
) -> list[CallSpec]:
    """`count` calls, each a random slice of the sample call; the first `transcribed` transcribe."""
    customer = read_wav_pcm(SAMPLE_DIR / "customer.wav")
    agent = read_wav_pcm(SAMPLE_DIR / "agent.wav")
    length = int(seconds * BYTES_PER_S) & ~1
    calls = []
    for i in range(count):
        start = rng.randrange(0, len(customer) - length) & ~1
        calls.append(
            CallSpec(
                f"{prefix}-{i:03d}-{rng.getrandbits(32):08x}",
                customer[start : start + length],
                agent[start : start + length],
                i < transcribed,
            )
        )
    return calls


def transcribed_slices(calls: list[CallSpec], prefix: str) -> list[CallSpec]:
    """The transcribed calls again under other contact ids (the undisturbed reference)."""
    return [
        CallSpec(f"{prefix}-{c.contact_id}", c.customer, c.agent, True)
        for c in calls
        if c.transcribe
    ]


def play_calls(
    env: dict[str, str], calls: list[CallSpec], rng: random.Random, stagger_s: float
) -> list[threading.Thread]:
    """Start every call's player in its own thread, `stagger_s` apart on average."""
    publisher = KinesisPublisher(
        aws.client("kinesis", env["APP_REGION"]), env["CALLSTREAM_CALLS_STREAM"]
    )
    threads = []
    for call in calls:
        thread = threading.Thread(target=_play_one, args=(env, call, publisher), daemon=True)
        thread.start()
        threads.append(thread)
        time.sleep(rng.uniform(0, 2 * stagger_s))
    return threads


def _play_one(env: dict[str, str], call: CallSpec, publisher: KinesisPublisher) -> None:
    player = CallPlayer(
        call.customer,
        call.agent,
        contact_id=call.contact_id,
        stream_name=f"chaos-{call.contact_id}"[:250],
        region=env["APP_REGION"],
        speed=SPEED,
    )

    def trigger(stream_arn: str, first_fragment: str) -> None:
        started = parse_trigger(
            {
                "streamARN": stream_arn,
                "startFragmentNum": first_fragment,
                "connectContactId": call.contact_id,
                "transcriptionEnabled": "true" if call.transcribe else "false",
            }
        )
        publisher.publish([started])

    player.play(trigger)


def kill_randomly(
    group: ServiceGroup,
    rng: random.Random,
    kills: int,
    every_s: float,
    stop: threading.Event,
    chaos: ChaosLog,
) -> None:
    """SIGKILL a random instance of each service in turn, `kills` times; start a new one each."""
    started = time.monotonic()
    next_index = 100
    order = list(SERVICES)
    rng.shuffle(order)  # every service is hit once before any is hit twice
    for kill in range(kills):
        if stop.wait(rng.uniform(0.5 * every_s, 1.5 * every_s)):
            return
        name = order[kill % len(order)]
        victims = [p for p in group.processes if p.name == name and p.alive()]
        victim = rng.choice(victims)
        victim.kill()
        group.processes.remove(victim)
        group.processes.append(ServiceProcess(name, next_index, group.env, group.log_dir))
        next_index += 1
        chaos.kills.append((round(time.monotonic() - started, 1), f"{name}-{victim.index}"))


def row_view(rows: list[dict[str, Any]], contact_id: str) -> list[tuple[Any, ...]]:
    """A call's rows without what differs between runs (contact id, write times)."""
    return sorted(
        (
            r["Track"],
            Decimal(r["StartTime"]),
            Decimal(r["EndTime"]),
            r["Transcript"],
            bool(r["IsPartial"]),
            r["SegmentId"].replace(contact_id, "<contact>"),
        )
        for r in rows
    )


def all_rows(env: dict[str, str], contact_id: str) -> list[tuple[Any, ...]]:
    """Both tables' rows of one call, as `row_view`."""
    rows = [row for table in read_rows(env, contact_id).values() for row in table]
    return row_view(rows, contact_id)


def wavs_stored(env: dict[str, str], calls: list[CallSpec]) -> bool:
    """Every call has its two WAVs."""
    return all(len(list_recordings(env, c.contact_id)) == 2 for c in calls)


def wait_until(check: Any, timeout_s: float, interval_s: float = 1.0) -> bool:
    """Poll `check()` until true or the timeout; early exit, no fixed sleeps."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return bool(check())


def wav_mismatches(env: dict[str, str], calls: list[CallSpec]) -> list[str]:
    """Keys whose PCM is not exactly what went into KVS (or that are missing)."""
    s3 = aws.client("s3", env["APP_REGION"])
    bad = []
    for call in calls:
        keys = list_recordings(env, call.contact_id)
        if len(keys) != 2:
            bad.append(f"{call.contact_id}: {keys}")
        for key in keys:
            body = s3.get_object(Bucket=env["RECORDINGS_BUCKET_NAME"], Key=key)["Body"].read()
            expected = call.customer if key.endswith("AUDIO_FROM_CUSTOMER.wav") else call.agent
            if body[44:] != expected:
                bad.append(f"{key}: {len(body) - 44} PCM bytes, expected {len(expected)}")
    return bad


class EndedCalls:
    """Contact ids whose CallEnded reached the transcripts stream (all finals are before it)."""

    def __init__(self, env: dict[str, str]) -> None:
        from callstream.bus.tail import StreamTail
        from callstream.events import CallEnded

        kinesis = aws.client("kinesis", env["APP_REGION"])
        self._tail = StreamTail(kinesis, env["CALLSTREAM_TRANSCRIPTS_STREAM"])
        self._type = CallEnded
        self.ended: set[str] = set()

    def include(self, contact_ids: list[str]) -> bool:
        """Poll, then whether every one of `contact_ids` has ended."""
        for event in self._tail.poll():
            if isinstance(event, self._type):
                self.ended.add(event.contact_id)
        return set(contact_ids) <= self.ended


def stable_rows(env: dict[str, str], contact_ids: list[str], timeout_s: float) -> dict[str, Any]:
    """The calls' rows once two reads a second apart agree (the persister has caught up)."""
    previous: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = {c: all_rows(env, c) for c in contact_ids}
        if current == previous and all(current.values()):
            return current
        previous = current
        time.sleep(1.0)
    return previous or {}


def describe_calls(env: dict[str, str], contact_ids: set[str]) -> dict[str, Any]:
    """What the audio stream holds for some calls (failure diagnostics)."""
    from callstream.bus.tail import StreamTail

    kinesis = aws.client("kinesis", env["APP_REGION"])
    seen: dict[str, Any] = {c: {"events": []} for c in contact_ids}
    for event in StreamTail(kinesis, env["CALLSTREAM_AUDIO_STREAM"]).poll():
        contact = getattr(event, "contact_id", None)
        if contact in seen:
            sequence = getattr(event, "sequence", "")
            track = getattr(event, "track", "")
            seen[contact]["events"].append(f"{type(event).__name__}{track}{sequence}")
    return seen


def quiet(env: dict[str, str], seconds: float = 3.0) -> None:
    """Wait until the transcripts stream has had no new records for `seconds`."""
    from callstream.bus.tail import StreamTail

    tail = StreamTail(
        aws.client("kinesis", env["APP_REGION"]), env["CALLSTREAM_TRANSCRIPTS_STREAM"]
    )
    last = time.monotonic()
    deadline = last + 60
    while time.monotonic() - last < seconds and time.monotonic() < deadline:
        if tail.poll():
            last = time.monotonic()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def chaos_stack(
    emulator: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], ServiceGroup]]:
    workdir = tmp_path_factory.mktemp("chaos")
    env = chaos_env(emulator.env(), workdir, f"chaos{SEED}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        provision_chaos(env)
        group = ServiceGroup(env, workdir / "logs")
        group.start(instances=2)
        try:
            yield env, group
        finally:
            group.stop()


def test_killing_instances_during_live_calls_loses_and_duplicates_nothing(
    chaos_stack: tuple[dict[str, str], ServiceGroup],
) -> None:
    env, group = chaos_stack
    rng = random.Random(SEED)
    calls = make_calls(rng, count=20, transcribed=2, seconds=6.0, prefix=f"c{SEED}")
    reference = transcribed_slices(calls, "ref")
    for thread in play_calls(env, reference, rng, stagger_s=0.2):
        thread.join()
    ended = EndedCalls(env)
    ref_ids = [r.contact_id for r in reference]
    assert wait_until(lambda: wavs_stored(env, reference), 150), "undisturbed WAVs missing"
    assert wait_until(lambda: ended.include(ref_ids), 240), "undisturbed calls not transcribed"
    ref_rows = stable_rows(env, ref_ids, 60)
    transcribed = [c.contact_id for c in calls if c.transcribe]
    expected = {c: ref_rows.get(r, []) for c, r in zip(transcribed, ref_ids, strict=True)}
    assert all(expected.values()), "the undisturbed run wrote no rows"

    stop = threading.Event()
    chaos = ChaosLog()
    monkey = threading.Thread(
        target=kill_randomly, args=(group, rng, 6, 2.0, stop, chaos), daemon=True
    )
    monkey.start()
    players = play_calls(env, calls, rng, stagger_s=0.5)
    for thread in players:
        thread.join()
    monkey.join()
    print(f"seed {SEED}: killed {chaos.kills}")

    def settled() -> bool:
        return (
            ended.include(transcribed)
            and wavs_stored(env, calls)
            and all(all_rows(env, contact) == rows for contact, rows in expected.items())
        )

    wait_until(settled, 240)
    quiet(env)
    bad = wav_mismatches(env, calls)
    assert bad == [], (chaos.kills, describe_calls(env, {b.split(":")[0] for b in bad}))
    for contact, rows in expected.items():
        assert all_rows(env, contact) == rows, (contact, chaos.kills)
    kinesis = aws.client("kinesis", env["APP_REGION"])
    assert list_dead_letters(kinesis, env["CALLSTREAM_DEADLETTER_STREAM"]) == []
