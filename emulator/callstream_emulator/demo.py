"""The one-command local run: emulator, four service processes, one sample call.

Starts the embedded emulator, provisions the streams, tables and bucket,
starts ingest, transcriber, recorder and persister as separate processes,
plays the sample call into the local KVS at real-time pace, triggers it the
way Connect does, prints the transcript live as segments land, and ends by
printing the DynamoDB rows and S3 keys the services produced.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from callstream import aws
from callstream.bus.tail import StreamTail
from callstream.config import BusSettings, Env
from callstream.events import CallEnded, TranscriptSegmentProduced
from callstream_emulator.emulator import CLEARED_ENV, Emulator
from callstream_emulator.processes import REPO_ROOT, ServiceGroup
from callstream_emulator.provision import provision
from callstream_emulator.simulator import CallPlayer, read_wav_pcm
from services.ingest.lambda_function import lambda_handler

SAMPLE_DIR = REPO_ROOT / "samples" / "call"


@dataclass
class CallOutcome:
    """What the services produced for one call."""

    contact_id: str
    finals: list[TranscriptSegmentProduced] = field(default_factory=list)
    ended: CallEnded | None = None
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    recordings: list[str] = field(default_factory=list)


def local_env(emulator: Emulator, workdir: Path) -> dict[str, str]:
    """The environment every process of a local run shares."""
    return {
        **emulator.env(),
        "RECORDINGS_BUCKET_NAME": os.environ.get(
            "RECORDINGS_BUCKET_NAME", "callstream-recordings-local"
        ),
        "RECORDINGS_KEY_PREFIX": os.environ.get("RECORDINGS_KEY_PREFIX", "recordings/"),
        "CALLSTREAM_SPOOL_DIR": str(workdir / "spool"),
        "CALLSTREAM_POLL_INTERVAL_MS": "100",
    }


def adopt_env(env: dict[str, str]) -> None:
    """Point this process's boto3 at the emulator too."""
    for name in CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)


def play_sample_call(
    env: dict[str, str],
    sample_dir: Path = SAMPLE_DIR,
    speed: float = 1.0,
    transcription: bool = True,
    contact_id: str | None = None,
) -> str:
    """Play the sample call into local KVS and trigger it; return its contact id."""
    contact_id = contact_id or str(uuid.uuid4())
    player = CallPlayer(
        read_wav_pcm(sample_dir / "customer.wav"),
        read_wav_pcm(sample_dir / "agent.wav"),
        contact_id=contact_id,
        stream_name=f"connect-demo-contact-{contact_id[:8]}",
        region=env["APP_REGION"],
        speed=speed,
    )

    def trigger(stream_arn: str, first_fragment: str) -> None:
        answer = lambda_handler(
            {
                "streamARN": stream_arn,
                "startFragmentNum": first_fragment,
                "connectContactId": contact_id,
                "transcriptionEnabled": "true" if transcription else "false",
            }
        )
        if answer["status"] != "accepted":
            raise RuntimeError(f"trigger refused: {answer}")

    player.play(trigger)
    return contact_id


def watch_call(
    env: dict[str, str],
    contact_id: str,
    timeout_s: float,
    on_segment: Callable[[TranscriptSegmentProduced], None] = lambda s: None,
    expect_recordings: int | None = None,
) -> CallOutcome:
    """Follow the transcripts stream until the call ended and its WAVs are stored
    (as many as `RECORDINGS_FORMAT` makes, unless `expect_recordings` says)."""
    bus = BusSettings.from_env(Env(env))
    if expect_recordings is None:
        expect_recordings = recordings_per_call(env)
    tail = StreamTail(aws.client("kinesis", bus.region), bus.transcripts_stream)
    outcome = CallOutcome(contact_id)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in tail.poll():
            if getattr(event, "contact_id", None) != contact_id:
                continue
            if isinstance(event, TranscriptSegmentProduced):
                on_segment(event)
                if not event.is_partial:
                    outcome.finals.append(event)
            elif isinstance(event, CallEnded):
                outcome.ended = event
        outcome.recordings = list_recordings(env, contact_id)
        if outcome.ended is not None and len(outcome.recordings) >= expect_recordings:
            break
        time.sleep(0.2)
    outcome.rows = read_rows(env, contact_id)
    return outcome


def recordings_per_call(env: dict[str, str]) -> int:
    """WAVs a call leaves: one stereo, one per track, or both (`RECORDINGS_FORMAT`)."""
    formats = Env(env).text("RECORDINGS_FORMAT", "stereo")
    return {"stereo": 1, "per-track": 2, "both": 3}.get(formats, 1)


def list_recordings(env: dict[str, str], contact_id: str) -> list[str]:
    """S3 keys of the call's WAVs."""
    s3 = aws.client("s3", env["APP_REGION"])
    prefix = env.get("RECORDINGS_KEY_PREFIX", "recordings/") + contact_id
    listed = s3.list_objects_v2(Bucket=env["RECORDINGS_BUCKET_NAME"], Prefix=prefix)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def read_rows(env: dict[str, str], contact_id: str) -> dict[str, list[dict[str, Any]]]:
    """The call's DynamoDB rows, per table, in StartTime order."""
    from services.persister.settings import PersisterSettings

    settings = PersisterSettings.from_env(env)
    table_api = aws.session(env["APP_REGION"]).resource("dynamodb")
    rows: dict[str, list[dict[str, Any]]] = {}
    for name in (settings.customer_table, settings.agent_table):
        response = table_api.Table(name).query(
            KeyConditionExpression="ContactId = :c",
            ExpressionAttributeValues={":c": contact_id},
            ConsistentRead=True,
        )
        rows[name] = response["Items"]
    return rows


def print_segment(out: TextIO) -> Callable[[TranscriptSegmentProduced], None]:
    """Printer of live segments: finals on their own line, partials overwritten on a tty."""
    tty = out.isatty()

    def show(segment: TranscriptSegmentProduced) -> None:
        stamp = f"[{segment.start_ms // 60000:02d}:{segment.start_ms % 60000 / 1000:04.1f}]"
        line = f"{stamp} {segment.track.speaker:>8}: {segment.transcript}"
        if segment.is_partial:
            if tty:
                out.write(f"\r\x1b[2K\x1b[2m{line[:150]}\x1b[0m")
                out.flush()
            return
        out.write(("\r\x1b[2K" if tty else "") + line + "\n")
        out.flush()

    return show


def run_demo(
    speed: float = 1.0, workdir: Path = Path(".callstream/demo"), out: TextIO = sys.stdout
) -> int:
    """The README's demo; returns a process exit code."""
    workdir.mkdir(parents=True, exist_ok=True)
    with Emulator() as emulator:
        env = local_env(emulator, workdir)
        adopt_env(env)
        names = provision(env)
        out.write(f"emulator: AWS {emulator.endpoint_url}, KVS media {emulator.media_url}\n")
        group = ServiceGroup(env, workdir / "logs")
        group.start()
        out.write(
            f"services: ingest, transcriber, recorder, persister (logs in {workdir / 'logs'})\n"
        )
        contact_id = str(uuid.uuid4())
        failures: list[BaseException] = []

        def play() -> None:
            try:
                play_sample_call(env, speed=speed, contact_id=contact_id)
            except BaseException as e:  # reported below; the watch then times out
                failures.append(e)
                out.write(f"the call simulator failed: {e!r}\n")

        player = threading.Thread(target=play, name="connect-simulator", daemon=True)
        out.write(f"call {contact_id}: playing the sample call into KVS...\n\n")
        try:
            player.start()
            outcome = watch_call(env, contact_id, timeout_s=180, on_segment=print_segment(out))
        finally:
            group.stop()
        return _report(outcome, names, out, recordings_per_call(env))


def _report(outcome: CallOutcome, names: dict[str, str], out: TextIO, recordings: int) -> int:
    out.write(f"\ncall ended: {outcome.ended.reason.value if outcome.ended else 'NOT SEEN'}\n")
    for table, rows in outcome.rows.items():
        out.write(f"\nDynamoDB {table}: {len(rows)} rows\n")
        for row in rows:
            out.write(f"  {row['StartTime']:>7}-{row['EndTime']:<7} {row['Transcript']}\n")
    out.write(f"\nS3 s3://{names['bucket']}/:\n")
    for key in outcome.recordings:
        out.write(f"  {key}\n")
    ok = (
        outcome.ended is not None
        and len(outcome.recordings) == recordings
        and any(outcome.rows.values())
    )
    out.write("\ndemo " + ("finished" if ok else "FAILED: see the service logs") + "\n")
    return 0 if ok else 1
