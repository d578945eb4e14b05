"""`callstream kvs dump STREAM`: save a Connect stream's audio, one file per track."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import wave
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE
from callstream.cli.common import CliError, aws_client, aws_options

# The package's name, not __name__: the warning keeps the logger name it always had on stderr.
log = logging.getLogger("callstream.cli")


def register(commands: Any) -> None:
    """Add `kvs dump` to the command parser."""
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
    aws_options(dump)
    dump.set_defaults(run=_kvs_dump)


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
            handle.setsampwidth(BYTES_PER_SAMPLE)
            handle.setframerate(SAMPLE_RATE)
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
    endpoint = aws_client("kinesisvideo").get_data_endpoint(APIName="GET_MEDIA", **ref)
    media = aws_client(
        "kinesis-video-media", endpoint_url=endpoint["DataEndpoint"], read_timeout=120
    )
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
