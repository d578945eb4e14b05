"""`callstream replay FILE`: play a WAV as a live call, or put an MKV capture, into KVS.

After the media, the trigger publishes CallStarted as the contact flow would
(unless `--no-trigger`).
"""

from __future__ import annotations

import argparse
import json
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from callstream.audio import BYTES_PER_SAMPLE, SAMPLE_RATE
from callstream.cli.common import CliError, aws_client, aws_options, bus_settings


def register(commands: Any) -> None:
    """Add `replay` to the command parser."""
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
    aws_options(replay)
    replay.set_defaults(run=_replay)


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
    from callstream_emulator.simulator import CallPlayer

    customer, agent = _wav_tracks(args.file, args.agent)
    contact_id = args.contact_id or _new_contact_id()
    player = CallPlayer(
        customer,
        agent,
        contact_id=contact_id,
        stream_name=args.stream_name or f"callstream-replay-{contact_id[:8]}",
        region=bus_settings().region,
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
    if width != BYTES_PER_SAMPLE or rate != SAMPLE_RATE or channels not in (1, 2):
        raise CliError(f"{path} must be 8 kHz 16-bit mono or stereo, is {channels}ch {rate} Hz")
    if channels == 2:
        samples = np.frombuffer(frames, dtype="<i2").reshape(-1, 2)
        return samples[:, 0].tobytes(), samples[:, 1].tobytes()
    if agent_path is None:
        return frames, b"\0" * len(frames)
    from callstream_emulator.simulator import read_wav_pcm

    return frames, read_wav_pcm(agent_path)


def _publish_trigger(contact_id: str, stream_arn: str, fragment: str) -> None:
    from services.ingest.lambda_function import lambda_handler

    answer = lambda_handler(
        {"streamARN": stream_arn, "startFragmentNum": fragment, "connectContactId": contact_id}
    )
    if answer["status"] != "accepted":
        raise CliError(f"the trigger refused the call: {answer.get('reason')}")
    _progress(f"triggered contact {contact_id}")


def _replay_mkv(args: argparse.Namespace) -> tuple[str, str, str]:
    from callstream import aws
    from callstream_emulator.kvs_producer import put_media
    from callstream_emulator.simulator import ensure_kvs_stream

    data = args.file.read_bytes()
    contact_id = args.contact_id or _contact_in(data) or _new_contact_id()
    region = bus_settings().region
    stream_arn = ensure_kvs_stream(
        region, args.stream_name or f"callstream-replay-{args.file.stem}"
    )
    endpoint = aws_client("kinesisvideo").get_data_endpoint(
        StreamARN=stream_arn, APIName="PUT_MEDIA"
    )
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


def _new_contact_id() -> str:
    # Imported here, not at the top: uuid loads `platform`, a cost `callstream --help` need not pay.
    import uuid

    return str(uuid.uuid4())


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
