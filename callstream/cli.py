"""`callstream` command line: local emulator, demo, replay, live views, dead letters, KVS dumps.

Exit codes: 0 success, 1 the work failed, 2 bad usage (or a bad setting).

Commands that talk to AWS use the ambient configuration (credentials chain,
region, `AWS_ENDPOINT_URL`); `--local` points them at the emulator started by
`callstream local up` instead, by reading its state file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

DEFAULT_STATE_FILE = ".callstream/local.json"
Command = Callable[[argparse.Namespace], int]
# Variables that would make boto3 ignore the emulator's endpoint or credentials.
_CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


class CliError(Exception):
    """The command could not do its work; the message says why (exit code 1)."""


# ---------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callstream", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_local(commands)
    demo = commands.add_parser("demo", help="run the sample call end to end on the emulator")
    demo.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    demo.set_defaults(run=_demo)
    trigger = commands.add_parser("trigger", help="publish CallStarted for a trigger event")
    trigger.add_argument("event", help="the event as JSON, or @file.json")
    _aws_options(trigger)
    trigger.set_defaults(run=_trigger)
    _add_replay(commands)
    _add_tail(commands)
    _add_calls(commands)
    _add_deadletters(commands)
    _add_kvs(commands)
    liveview = commands.add_parser(
        "liveview", help="the live call view: a web page on 127.0.0.1 (Ctrl-C stops it)"
    )
    liveview.add_argument("--port", type=int, default=8080)
    liveview.add_argument("--bucket", help="recordings bucket (default RECORDINGS_BUCKET_NAME)")
    _aws_options(liveview)
    liveview.set_defaults(run=_liveview)
    return parser


def _aws_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--local", action="store_true", help="use the emulator of `callstream local up`"
    )
    parser.add_argument(
        "--state-file", default=DEFAULT_STATE_FILE, help="the emulator's state file (--local)"
    )


def _add_local(commands: Any) -> None:
    local = commands.add_parser("local", help="the embedded emulator")
    sub = local.add_subparsers(dest="local_command", required=True, metavar="COMMAND")
    up = sub.add_parser("up", help="start the emulator and wait (Ctrl-C stops it)")
    up.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    up.add_argument("--port", type=int, default=4566)
    up.add_argument("--media-port", type=int, default=4567)
    up.set_defaults(run=_local_up)
    down = sub.add_parser("down", help="stop the emulator started by `local up`")
    down.add_argument("--state-file", default=DEFAULT_STATE_FILE)
    down.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for it")
    down.set_defaults(run=_local_down)


def _add_replay(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="play a WAV as a live call, or put an MKV capture, into KVS and trigger it",
        description="A WAV (8 kHz 16-bit; mono = customer, stereo = customer left, agent "
        "right) is played in Connect's fragment layout at --speed; an MKV capture is put "
        "as it is. Then the trigger publishes CallStarted as the contact flow would.",
    )
    replay.add_argument("file", type=Path, help="a .wav or .mkv file")
    replay.add_argument("--agent", type=Path, help="a mono WAV for the agent track")
    replay.add_argument("--contact-id", help="default: a new UUID (MKV: its ContactId tag)")
    replay.add_argument("--stream-name", help="KVS stream (created if absent)")
    replay.add_argument("--speed", type=float, default=1.0, help="WAV pace (1 = real time)")
    replay.add_argument("--no-trigger", action="store_true", help="only put the media")
    _aws_options(replay)
    replay.set_defaults(run=_replay)


def _add_tail(commands: Any) -> None:
    tail = commands.add_parser("tail", help="a call's transcript, live, until the call ends")
    tail.add_argument("contact_id", metavar="CONTACT_ID")
    tail.add_argument("--partials", action="store_true", help="print partial segments too")
    tail.add_argument("--latest", action="store_true", help="only what arrives from now on")
    tail.add_argument("--timeout", type=float, help="give up (exit 1) after this many seconds")
    _aws_options(tail)
    tail.set_defaults(run=_tail)


def _add_calls(commands: Any) -> None:
    calls = commands.add_parser(
        "calls",
        help="active calls and their lag, from the audio and transcripts streams",
        description="CAPTURE LAG: now minus the end of the newest audio chunk (how far ingest "
        "is behind the live call). TRANSCRIPT LAG: audio captured minus audio transcribed.",
    )
    calls.add_argument("--since-minutes", type=float, default=60.0, help="how far back to read")
    calls.add_argument("--all", action="store_true", help="ended calls too")
    calls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _aws_options(calls)
    calls.set_defaults(run=_calls)


def _add_deadletters(commands: Any) -> None:
    letters = commands.add_parser("deadletters", help="records the services could not process")
    sub = letters.add_subparsers(dest="deadletters_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="list dead letters")
    listing.add_argument("--since-minutes", type=float, default=24 * 60.0)
    listing.add_argument("--service", help="only this service's")
    listing.add_argument("--reason", help="only letters whose reason contains this")
    listing.add_argument("--json", action="store_true", help="JSON lines")
    _aws_options(listing)
    listing.set_defaults(run=_deadletters_list)
    redrive = sub.add_parser(
        "redrive",
        help="put dead letters back on their source stream (each original record once)",
    )
    redrive.add_argument("--service", help="only this service's")
    redrive.add_argument("--reason", help="only letters whose reason contains this")
    redrive.add_argument(
        "--dry-run", action="store_true", help="say what would be put back, put nothing"
    )
    _aws_options(redrive)
    redrive.set_defaults(run=_deadletters_redrive)


def _add_kvs(commands: Any) -> None:
    kvs = commands.add_parser("kvs", help="Kinesis Video Streams tools")
    sub = kvs.add_subparsers(dest="kvs_command", required=True, metavar="COMMAND")
    dump = sub.add_parser(
        "dump",
        help="save a Connect stream's audio per track (WAV or raw PCM)",
        description="Reads the stream with GetMedia and writes one file per track. With "
        "--contact-id it skips other contacts' audio and stops when the contact ends.",
    )
    dump.add_argument("stream", metavar="STREAM", help="stream name or ARN")
    start = dump.add_mutually_exclusive_group()
    start.add_argument("--fragment", help="start at this fragment number")
    start.add_argument("--timestamp", help="start at this producer time (ISO-8601 or epoch s)")
    dump.add_argument("--contact-id", help="only this contact's audio; stop at its end")
    dump.add_argument("--track", choices=("customer", "agent", "both"), default="both")
    dump.add_argument("--format", choices=("wav", "raw"), default="wav")
    dump.add_argument("--out", type=Path, default=Path("."), help="output directory")
    _aws_options(dump)
    dump.set_defaults(run=_kvs_dump)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `callstream` command; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from callstream.errors import ConfigError

    try:
        if getattr(args, "local", False):
            _adopt_local(Path(args.state_file))
        code: int = args.run(args)
        return code
    except ConfigError as e:
        print(f"callstream: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 1
    except Exception as e:
        print(f"callstream: error: {_describe(e)}", file=sys.stderr)
        log.debug("command failed", exc_info=True)
        return 1


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, CliError) else f"{type(error).__name__}: {error}"


def _adopt_local(state_file: Path) -> None:
    """Point this process's boto3 at the emulator `callstream local up` started."""
    state = _read_state(state_file)
    for name in _CLEARED_ENV:
        os.environ.pop(name, None)
    os.environ.update(state["env"])


def _read_state(state_file: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CliError(
            f"no emulator state file at {state_file}: run `callstream local up`"
        ) from None
    return state


def _bus() -> Any:
    from callstream.config import BusSettings, Env

    return BusSettings.from_env(Env())


def _client(service: str, **kwargs: Any) -> Any:
    from callstream import aws

    return aws.client(service, _bus().region, **kwargs)


# ---------------------------------------------------------------- local, demo, trigger


def _local_up(args: argparse.Namespace) -> int:
    from callstream.local.emulator import run_forever

    run_forever(args.state_file, port=args.port, media_port=args.media_port)
    return 0


def _local_down(args: argparse.Namespace) -> int:
    path = Path(args.state_file)
    pid = int(_read_state(path)["pid"])
    if not _is_emulator(pid):
        path.unlink(missing_ok=True)
        raise CliError(f"the emulator (pid {pid}) is not running; removed stale {path}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    # The emulator removes its state file as it stops (a zombie pid may linger).
    while path.exists() and _is_emulator(pid):
        if time.monotonic() > deadline:
            raise CliError(f"the emulator (pid {pid}) did not stop within {args.timeout:g} s")
        time.sleep(0.05)
    print(f"emulator (pid {pid}) stopped")
    return 0


def _is_emulator(pid: int) -> bool:
    """The pid is alive and is a callstream process (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        return not Path("/proc/self").exists()  # no procfs: trust the pid
    text = cmdline.read_bytes().replace(b"\0", b" ")
    return b"callstream" in text


def _demo(args: argparse.Namespace) -> int:
    from callstream.local.demo import run_demo

    return run_demo(speed=args.speed)


def _trigger(args: argparse.Namespace) -> int:
    from services.ingest.handler import lambda_handler

    text = Path(args.event[1:]).read_text() if args.event.startswith("@") else args.event
    try:
        event = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"the event is not JSON: {e}") from e
    answer = lambda_handler(event)
    print(json.dumps(answer))
    return 0 if answer["status"] == "accepted" else 1


def _liveview(args: argparse.Namespace) -> int:
    from services.liveview.main import main as liveview_main

    os.environ["CALLSTREAM_LIVEVIEW_PORT"] = str(args.port)
    if args.bucket:
        os.environ["RECORDINGS_BUCKET_NAME"] = args.bucket
    elif args.local:
        os.environ.setdefault("RECORDINGS_BUCKET_NAME", "callstream-recordings-local")
    liveview_main()
    return 0


# ---------------------------------------------------------------- replay


def _replay(args: argparse.Namespace) -> int:
    suffix = args.file.suffix.lower()
    if suffix not in (".wav", ".mkv", ".webm"):
        raise CliError(f"{args.file}: expected a .wav or .mkv file")
    if not args.file.is_file():
        raise CliError(f"{args.file}: no such file")
    if suffix == ".wav":
        contact_id, stream_arn, fragment = _replay_wav(args)
    else:
        contact_id, stream_arn, fragment = _replay_mkv(args)
    print(json.dumps({"contactId": contact_id, "streamARN": stream_arn, "fragment": fragment}))
    return 0


def _replay_wav(args: argparse.Namespace) -> tuple[str, str, str]:
    from callstream.local.simulator import CallPlayer

    customer, agent = _wav_tracks(args.file, args.agent)
    contact_id = args.contact_id or str(uuid.uuid4())
    player = CallPlayer(
        customer,
        agent,
        contact_id=contact_id,
        stream_name=args.stream_name or f"callstream-replay-{contact_id[:8]}",
        region=_bus().region,
        speed=args.speed,
    )
    first: list[str] = []

    def on_start(stream_arn: str, fragment: str) -> None:
        first.append(fragment)
        _progress(f"playing {args.file} into {stream_arn} from fragment {fragment}")
        if not args.no_trigger:
            _publish_trigger(contact_id, stream_arn, fragment)

    player.play(on_start)
    return contact_id, player.stream_arn, first[0]


def _wav_tracks(path: Path, agent_path: Path | None) -> tuple[bytes, bytes]:
    """(customer, agent) PCM: mono is the customer, stereo is customer left / agent right."""
    import numpy as np

    with wave.open(str(path), "rb") as wav:
        channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
        frames = wav.readframes(wav.getnframes())
    if width != 2 or rate != 8000 or channels not in (1, 2):
        raise CliError(f"{path} must be 8 kHz 16-bit mono or stereo, is {channels}ch {rate} Hz")
    if channels == 2:
        samples = np.frombuffer(frames, dtype="<i2").reshape(-1, 2)
        return samples[:, 0].tobytes(), samples[:, 1].tobytes()
    if agent_path is None:
        return frames, b"\0" * len(frames)
    from callstream.local.simulator import read_wav_pcm

    return frames, read_wav_pcm(agent_path)


def _publish_trigger(contact_id: str, stream_arn: str, fragment: str) -> None:
    from services.ingest.handler import lambda_handler

    answer = lambda_handler(
        {"streamARN": stream_arn, "startFragmentNum": fragment, "connectContactId": contact_id}
    )
    if answer["status"] != "accepted":
        raise CliError(f"the trigger refused the call: {answer.get('reason')}")
    _progress(f"triggered contact {contact_id}")


def _replay_mkv(args: argparse.Namespace) -> tuple[str, str, str]:
    from callstream import aws
    from callstream.local.kvs_producer import put_media
    from callstream.local.simulator import ensure_kvs_stream

    data = args.file.read_bytes()
    contact_id = args.contact_id or _contact_in(data) or str(uuid.uuid4())
    region = _bus().region
    stream_arn = ensure_kvs_stream(
        region, args.stream_name or f"callstream-replay-{args.file.stem}"
    )
    endpoint = _client("kinesisvideo").get_data_endpoint(StreamARN=stream_arn, APIName="PUT_MEDIA")
    acks = put_media(
        endpoint["DataEndpoint"],
        stream_arn,
        _pieces(data, 64 * 1024),
        region=region,
        credentials=aws.session(region).get_credentials(),
    )
    fragments = [str(a["FragmentNumber"]) for a in acks if a.get("FragmentNumber")]
    if not fragments:
        raise CliError(f"KVS acknowledged no fragment of {args.file}: {acks[-3:]}")
    first = min(fragments, key=int)
    _progress(f"put {len(data)} bytes ({len(set(fragments))} fragments) into {stream_arn}")
    if not args.no_trigger:
        _publish_trigger(contact_id, stream_arn, first)
    return contact_id, stream_arn, first


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def _contact_in(data: bytes) -> str | None:
    """The first Connect ContactId tag of an MKV capture."""
    from callstream.mkv import MkvStreamReader, TagsRead

    for event in MkvStreamReader().feed(data):
        if isinstance(event, TagsRead):
            for name, value in event.tags:
                if name == "ContactId":
                    return value
    return None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tail


def _tail(args: argparse.Namespace) -> int:
    from callstream.bus.tail import StreamTail
    from callstream.events import CallEnded, TranscriptSegmentProduced

    tail = StreamTail(_client("kinesis"), _bus().transcripts_stream, latest=args.latest)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while deadline is None or time.monotonic() < deadline:
        batch = tail.poll()
        for event in batch:
            if getattr(event, "contact_id", None) != args.contact_id:
                continue
            if isinstance(event, TranscriptSegmentProduced):
                if args.partials or not event.is_partial:
                    print(format_segment(event), flush=True)
            elif isinstance(event, CallEnded):
                print(f"-- call ended: {event.reason.value}", flush=True)
                return 0
        if not batch:
            time.sleep(0.2)
    raise CliError(f"call {args.contact_id} did not end within {args.timeout:g} s")


def format_segment(segment: Any) -> str:
    """`[mm:ss.s] speaker: text` (partials marked with `~`)."""
    start = segment.start_ms
    stamp = f"[{start // 60000:02d}:{start % 60000 / 1000:04.1f}]"
    mark = "~" if segment.is_partial else ":"
    return f"{stamp} {segment.track.speaker:>8}{mark} {segment.transcript}"


# ---------------------------------------------------------------- reading a window of a stream


def read_since(kinesis: Any, stream: str, since_ms: int) -> Iterator[Any]:
    """Every decodable event of `stream` written since `since_ms`, shard by shard, to now."""
    from callstream.contract import default_contract
    from callstream.errors import PoisonRecordError

    contract = default_contract()
    for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=stream,
            ShardId=shard["ShardId"],
            ShardIteratorType="AT_TIMESTAMP",
            Timestamp=datetime.fromtimestamp(since_ms / 1000, UTC),
        )["ShardIterator"]
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator, Limit=1000)
            for record in page["Records"]:
                with contextlib.suppress(PoisonRecordError):
                    yield contract.decode(record["Data"])
            iterator = page.get("NextShardIterator")
            if not page["Records"] and page.get("MillisBehindLatest", 0) == 0:
                break


# ---------------------------------------------------------------- calls


@dataclass
class CallView:
    """What the streams say about one call."""

    contact_id: str
    started_ms: int | None = None
    captured_ms: int = 0
    captured_until_ms: int | None = None
    transcribed_ms: int = 0
    ended: str | None = None

    def row(self, now_ms: int) -> dict[str, Any]:
        """The call as a dict with its lags in seconds."""
        capture_lag = None
        if self.captured_until_ms is not None and self.ended is None:
            capture_lag = round((now_ms - self.captured_until_ms) / 1000, 1)
        return {
            **asdict(self),
            "capture_lag_s": capture_lag,
            "transcript_lag_s": round(max(0, self.captured_ms - self.transcribed_ms) / 1000, 1),
        }


def collect_calls(kinesis: Any, bus: Any, since_ms: int) -> dict[str, CallView]:
    """Fold the audio and transcripts streams into one view per call."""
    from callstream.events import AudioChunkCaptured, CallEnded, CallStarted
    from callstream.events import TranscriptSegmentProduced as Segment

    calls: dict[str, CallView] = {}
    for stream in (bus.audio_stream, bus.transcripts_stream):
        for event in read_since(kinesis, stream, since_ms):
            contact = getattr(event, "contact_id", None)
            if contact is None:
                continue
            view = calls.setdefault(contact, CallView(contact))
            if isinstance(event, CallStarted):
                view.started_ms = event.requested_at_ms
            elif isinstance(event, AudioChunkCaptured):
                length_ms = len(event.pcm) // 16
                view.captured_ms = max(view.captured_ms, event.offset_ms + length_ms)
                until = event.start_time_ms + length_ms
                view.captured_until_ms = max(view.captured_until_ms or 0, until)
            elif isinstance(event, Segment):
                view.transcribed_ms = max(view.transcribed_ms, event.end_ms)
            elif isinstance(event, CallEnded):
                view.ended = event.reason.value
    return calls


def _calls(args: argparse.Namespace) -> int:
    bus = _bus()
    now_ms = int(time.time() * 1000)
    since_ms = now_ms - int(args.since_minutes * 60_000)
    calls = collect_calls(_client("kinesis"), bus, since_ms)
    rows = [v.row(now_ms) for v in calls.values() if args.all or v.ended is None]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    _print_calls(rows, sys.stdout)
    return 0


def _print_calls(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = (
        f"{'CONTACT':<38} {'STATE':<16} {'CAPTURED':>9} {'CAPTURE LAG':>12} {'TRANSCRIPT LAG':>15}"
    )
    out.write(header + "\n")
    for row in rows:
        lag = "-" if row["capture_lag_s"] is None else f"{row['capture_lag_s']:.1f}s"
        state = row["ended"] or "in progress"
        out.write(
            f"{row['contact_id']:<38} {state:<16} {row['captured_ms'] / 1000:>8.1f}s "
            f"{lag:>12} {row['transcript_lag_s']:>14.1f}s\n"
        )
    if not rows:
        out.write("(no calls)\n")


# ---------------------------------------------------------------- dead letters


def _deadletters_list(args: argparse.Namespace) -> int:
    from callstream.deadletters import list_dead_letters

    since_ms = int(time.time() * 1000) - int(args.since_minutes * 60_000)
    entries = list_dead_letters(
        _client("kinesis"), _bus().deadletter_stream, service=args.service, reason=args.reason
    )
    entries = [e for e in entries if e.letter.failed_at_ms >= since_ms]
    for entry in entries:
        letter = entry.letter
        if args.json:
            fields = {k: v for k, v in asdict(letter).items() if k != "data"}
            print(json.dumps({"id": entry.id, **fields, "bytes": len(letter.data)}))
        else:
            when = datetime.fromtimestamp(letter.failed_at_ms / 1000, UTC).isoformat()
            print(f"{entry.id} {when} {letter.service:<12} {entry.original}: {letter.reason}")
    if not args.json:
        print(f"{len(entries)} dead letter(s)", file=sys.stderr)
    return 0


def _deadletters_redrive(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("callstream.deadletters")
    except ModuleNotFoundError:
        raise CliError(
            "redrive needs callstream.deadletters, which is not in this installation"
        ) from None
    bus = _bus()
    report = module.redrive(
        _client("kinesis"),
        _client("dynamodb"),
        deadletter_stream=bus.deadletter_stream,
        ledger_table=bus.lease_table,
        service=args.service,
        reason=args.reason,
        dry_run=args.dry_run,
    )
    print(json.dumps({"dry_run": args.dry_run, **asdict(report)}))
    return 0


# ---------------------------------------------------------------- kvs dump


_TRACKS: dict[str, tuple[str, ...]] = {
    "customer": ("AUDIO_FROM_CUSTOMER",),
    "agent": ("AUDIO_TO_CUSTOMER",),
    "both": ("AUDIO_FROM_CUSTOMER", "AUDIO_TO_CUSTOMER"),
}


class TrackFiles:
    """One output file per track, WAV (8 kHz 16-bit mono) or raw PCM."""

    def __init__(self, directory: Path, stem: str, fmt: str, tracks: tuple[str, ...]) -> None:
        self.directory = directory
        self.stem = stem
        self.fmt = fmt
        self.tracks = tracks
        self.bytes: dict[str, int] = {}
        self._open: dict[str, Any] = {}

    def write(self, track: str | None, pcm: bytes) -> None:
        """Append a frame's PCM to its track's file (other tracks are ignored)."""
        if track not in self.tracks:
            return
        handle = self._open.get(track) or self._create(track)
        if self.fmt == "wav":
            handle.writeframesraw(pcm)
        else:
            handle.write(pcm)
        self.bytes[track] = self.bytes.get(track, 0) + len(pcm)

    def close(self) -> list[Path]:
        """Finish the files; return their paths."""
        for handle in self._open.values():
            handle.close()
        return [self._path(track) for track in self._open]

    def _path(self, track: str) -> Path:
        return self.directory / f"{self.stem}_{track}.{self.fmt}"

    def _create(self, track: str) -> Any:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle: Any
        if self.fmt == "wav":
            handle = wave.open(str(self._path(track)), "wb")  # noqa: SIM115 (closed in close())
            handle.setnchannels(1)
            handle.setsampwidth(2)
            handle.setframerate(8000)
        else:
            handle = self._path(track).open("wb")
        self._open[track] = handle
        return handle


class ContactGate:
    """Lets through only one contact's frames and says when that contact is over."""

    def __init__(self, contact_id: str | None) -> None:
        self.contact_id = contact_id
        self.current: str | None = None
        self.seen = False
        self.over = False

    def tags(self, tags: tuple[tuple[str, str], ...]) -> None:
        """A fragment's tags: a ContactId tag switches the contact."""
        for name, value in tags:
            if name == "ContactId":
                if self.seen and value != self.contact_id:
                    self.over = True
                self.current = value
                self.seen = self.seen or value == self.contact_id

    def open(self) -> bool:
        """Frames now belong to the wanted contact (or no contact was asked for)."""
        return self.contact_id is None or (self.current == self.contact_id and not self.over)


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    if args.fragment:
        return {"StartSelectorType": "FRAGMENT_NUMBER", "AfterFragmentNumber": args.fragment}
    if args.timestamp:
        return {"StartSelectorType": "PRODUCER_TIMESTAMP", "StartTimestamp": _when(args.timestamp)}
    return {"StartSelectorType": "EARLIEST"}


def _when(text: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CliError(f"--timestamp must be ISO-8601 or epoch seconds, got {text!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _stream_name(stream: str) -> str:
    """The name in `arn:...:stream/<name>/<creation time>`, or the name itself."""
    return stream.split("/")[1] if stream.startswith("arn:") else stream


def _stream_ref(stream: str) -> dict[str, str]:
    return {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}


def _get_media(stream: str, selector: dict[str, Any]) -> Iterator[bytes]:
    ref = _stream_ref(stream)
    endpoint = _client("kinesisvideo").get_data_endpoint(APIName="GET_MEDIA", **ref)
    media = _client("kinesis-video-media", endpoint_url=endpoint["DataEndpoint"], read_timeout=120)
    payload = media.get_media(StartSelector=selector, **ref)["Payload"]
    raw = getattr(payload, "_raw_stream", None)
    try:
        while True:
            data = raw.read1(64 * 1024) if raw is not None else payload.read(64 * 1024)
            if not data:
                return
            yield data
    finally:
        payload.close()


def _kvs_dump(args: argparse.Namespace) -> int:
    stem = args.contact_id or _stream_name(args.stream)
    files = TrackFiles(args.out, stem, args.format, _TRACKS[args.track])
    gate = ContactGate(args.contact_id)
    progress = _Progress()
    try:
        _dump_into(_get_media(args.stream, _selector(args)), files, gate, progress)
    finally:
        paths = files.close()
    progress.done(files.bytes)
    if args.contact_id and not gate.seen:
        raise CliError(f"contact {args.contact_id} was not found on {args.stream}")
    for path in paths:
        print(path)
    return 0 if paths else 1


def _dump_into(
    chunks: Iterator[bytes], files: TrackFiles, gate: ContactGate, progress: Any
) -> None:
    from callstream.mkv import FrameRead, MkvStreamReader, StreamError, TagsRead

    reader = MkvStreamReader()
    for chunk in chunks:
        progress.read(len(chunk))
        for event in reader.feed(chunk):
            if isinstance(event, TagsRead):
                gate.tags(event.tags)
                if gate.over:
                    return
            elif isinstance(event, FrameRead) and gate.open():
                files.write(event.track_name, event.data)
            elif isinstance(event, StreamError):
                log.warning("corrupt media at byte %d: %s", event.offset, event.reason)


class _Progress:
    """Bytes read, to stderr, at most once a second."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.total = 0
        self._last = time.monotonic()

    def read(self, size: int) -> None:
        self.total += size
        if time.monotonic() - self._last >= 1.0:
            self._last = time.monotonic()
            self.out.write(f"\rread {self.total / 1e6:.1f} MB")
            self.out.flush()

    def done(self, per_track: dict[str, int]) -> None:
        seconds = ", ".join(f"{t} {n / 16000:.1f} s" for t, n in per_track.items()) or "no audio"
        self.out.write(f"\rread {self.total / 1e6:.1f} MB: {seconds}\n")
        self.out.flush()


if __name__ == "__main__":
    sys.exit(main())
