"""Speech end -> final row in DynamoDB for the sample call, quotas on, polling and fan-out.

For each read mode, starts the embedded emulator (Kinesis per-shard quotas
on, as everywhere) and the four services as processes (offline engine), all
in that mode (`CALLSTREAM_READ_MODE`), and plays the sample call into KVS in
real time. Audio is streamed as Connect streams it, block by block: the
player cuts the call into 128 ms fragments (two 64 ms blocks) and puts each
one when its last sample has been spoken, not before. The call's DynamoDB
rows are read every 50 ms; a final row's latency is the wall time it was
first seen minus (the wall time of the call's first sample + the row's
EndTime), EndTime being where the engine's words end: call-relative speech
end. The 50 ms read adds about 25 ms on average. p50 and p95 over every
final row of `--calls` sequential calls per mode (target p50 <= 1.5 s).

    .venv/bin/python bench/final_row_latency.py --modes polling efo --calls 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import numpy as np

from callstream.mkv.writer import ConnectCallWriter
from callstream_emulator.demo import SAMPLE_DIR, adopt_env, local_env, read_rows
from callstream_emulator.emulator import Emulator
from callstream_emulator.processes import ServiceGroup
from callstream_emulator.provision import provision
from callstream_emulator.simulator import CallPlayer, read_wav_pcm
from services.ingest.lambda_function import lambda_handler

BLOCKS_PER_FRAGMENT = 2  # 2 x 64 ms: fragments put as their audio ends, like streamed blocks
ROW_READ_S = 0.05


class RealTimePlayer(CallPlayer):
    """Puts each 128 ms fragment once its audio has been spoken; notes the first sample's time."""

    def __init__(self, customer: bytes, agent: bytes, *, contact_id: str, region: str) -> None:
        super().__init__(
            customer, agent, contact_id=contact_id, stream_name=f"bench-{contact_id}", region=region
        )
        self.writer = ConnectCallWriter(
            contact_id,
            "00000000-0000-4000-8000-000000000000",
            self.start_ms,
            blocks_per_fragment=BLOCKS_PER_FRAGMENT,
        )
        self.first_sample_at = 0.0

    def _paced_chunks(self) -> Iterator[bytes]:
        yield self.writer.producer_header()
        step = self.writer.fragment_bytes
        started = time.time()
        self.first_sample_at = started
        for offset in range(0, max(len(self.customer), len(self.agent)), step):
            spoken = started + min(offset + step, len(self.customer)) / 16000
            time.sleep(max(0.0, spoken - time.time()))
            yield self.writer.producer_fragment(
                self.customer[offset : offset + step], self.agent[offset : offset + step]
            )


def one_call(env: dict[str, str]) -> list[float]:
    """Play the sample call once; the latency of each of its final rows, in seconds."""
    contact = str(uuid.uuid4())
    player = RealTimePlayer(
        read_wav_pcm(SAMPLE_DIR / "customer.wav"),
        read_wav_pcm(SAMPLE_DIR / "agent.wav"),
        contact_id=contact,
        region=env["APP_REGION"],
    )

    def trigger(stream_arn: str, first_fragment: str) -> None:
        answer = lambda_handler(
            {
                "streamARN": stream_arn,
                "startFragmentNum": first_fragment,
                "connectContactId": contact,
                "transcriptionEnabled": "true",
            }
        )
        if answer["status"] != "accepted":
            raise RuntimeError(f"trigger refused: {answer}")

    playing = threading.Thread(target=player.play, args=(trigger,), daemon=True)
    playing.start()
    seen: dict[tuple[str, Decimal], float] = {}
    ends: dict[tuple[str, Decimal], Decimal] = {}
    quiet_since = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = time.time()
        for table, rows in read_rows(env, contact).items():
            for row in rows:
                key = (table, Decimal(row["StartTime"]))
                if not row.get("IsPartial") and key not in seen:
                    seen[key] = now
                    ends[key] = Decimal(row["EndTime"])
        if not playing.is_alive():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 10:  # every final is in well before this
                break
        time.sleep(ROW_READ_S)
    return [seen[k] - (player.first_sample_at + float(ends[k])) for k in seen]


def measure(mode: str, calls: int) -> str:
    """Latencies of `calls` sample calls, one after the other, with every service in `mode`."""
    with Emulator() as emulator, tempfile.TemporaryDirectory() as workdir:
        env = {
            **local_env(emulator, Path(workdir)),
            "CALLSTREAM_ASR_ENGINE": "offline",
            "CALLSTREAM_READ_MODE": mode,
        }
        adopt_env(env)
        provision(env)
        group = ServiceGroup(env, Path(workdir) / "logs")
        group.start()
        try:
            time.sleep(8.0)  # model load
            latencies: list[float] = []
            for _ in range(calls):
                latencies += one_call(env)
        finally:
            group.stop()
    if not latencies:
        return f"{mode}: no final rows"
    p50, p95 = np.percentile(latencies, [50, 95])
    return (
        f"{mode}: {len(latencies)} final rows over {calls} calls: speech end -> final row "
        f"p50 {p50:.2f} s, p95 {p95:.2f} s, min {min(latencies):.2f} s, max {max(latencies):.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["polling", "efo"])
    parser.add_argument("--calls", type=int, default=1)
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}; load average {os.getloadavg()}")
    if len(args.modes) > 1:  # one process per mode: the trigger keeps its first emulator's client
        for mode in args.modes:
            command = [sys.executable, __file__, "--modes", mode, "--calls", str(args.calls)]
            subprocess.run(command, check=True)
        return
    print(measure(args.modes[0], args.calls), flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
