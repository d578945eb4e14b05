"""Benchmark of the offline speech engine (Moonshine base-en on onnxruntime).

Stand-alone: ``.venv/bin/python bench/asr_offline.py`` (about 6 minutes).
Prints, on this machine, with the engine's default settings:

- WER of finals (partials off) on the sample call (samples/call, both tracks)
  and on the utterance set (samples/utterances, 14 clips), each fed in 20 ms
  pieces with a poll after each; for the utterance set also the one-shot WER
  (each whole clip upsampled and decoded at once, no endpointer) and every
  utterance the streamed path got wrong. Normalisation: lowercase, hyphens to
  spaces, other punctuation dropped, whitespace collapsed; nothing else (no
  spelling variants: "metres" for "meters" is an error);
- real-time factor per stream on one core: CPU seconds of the polling thread
  per second of audio (onnxruntime runs single-threaded), sample call fed as
  fast as possible in 20 ms pieces, finals only and with partials;
- latencies with partials on, the sample call (two tracks) fed at real-time
  pace in 20 ms ticks on two pool threads, `--latency-runs` times: first
  partial after speech start (the final's start_ms, from the VAD), final
  after speech end (its end_ms, the VAD's last speech frame) and after the
  end of the reference phrase it covers (reference.json), p50 and p90;
- capacity with partials on: N staggered tracks (alternately the agent and
  the customer track, `--seconds` each) fed at real-time pace through a
  thread pool of one worker per core, starting at the issue's target of
  4 tracks a core and growing by 40 % until a run fails (sustained = every
  stream finishes within 2 s of its audio ending and final latency p90 stays
  under 3 s); reported as tracks and tracks per core;
- whether the two engines share one model, and the peak resident memory of
  the process (both engines, every stream above).

The machine is shared: the 1-minute load average is sampled every 5 s
during the run and printed (mean, max), and with each capacity trial.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import threading
import time
import wave
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jiwer
import numpy as np
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callstream.asr.offline.engine import OfflineEngine, OfflineStream, tidy  # noqa: E402
from callstream.asr.port import Hypothesis  # noqa: E402

SAMPLES = ROOT / "samples"
BYTES_PER_SECOND = 16000
CHUNK = 320  # 20 ms
TARGET_PER_CORE = 4  # issue #6: live tracks a core must sustain with partials on
TRACKS = {"AUDIO_TO_CUSTOMER": "agent.wav", "AUDIO_FROM_CUSTOMER": "customer.wav"}


def normalise(text: str) -> str:
    """Lowercase, hyphens to spaces, punctuation dropped, whitespace collapsed."""
    text = re.sub(r"[^\w\s']|'(?!\w)", " ", text.lower().replace("-", " "))
    return " ".join(text.split())


def read_pcm(path: Path) -> bytes:
    with wave.open(str(path)) as w:
        return w.readframes(w.getnframes())


def run_stream(stream: OfflineStream, pcm: bytes) -> list[Hypothesis]:
    """Feed as fast as possible in 20 ms pieces, polling after each."""
    out: list[Hypothesis] = []
    for at in range(0, len(pcm), CHUNK):
        stream.send(pcm[at : at + CHUNK])
        out += stream.poll()
    return out + stream.close()


def measure_rtf(engine: OfflineEngine, call: dict[str, bytes]) -> tuple[float, dict[str, str]]:
    """CPU-time RTF over both call tracks, and each track's finals as text."""
    cpu = 0.0
    texts: dict[str, str] = {}
    for track, pcm in call.items():
        stream = engine.open_stream(contact_id="bench", track=track, language="en-US")
        start = time.thread_time()
        hyps = run_stream(stream, pcm)
        cpu += time.thread_time() - start
        texts[track] = " ".join(h.text for h in hyps if not h.is_partial)
    audio = sum(len(p) for p in call.values()) / BYTES_PER_SECOND
    return cpu / audio, texts


def call_wer(texts: dict[str, str]) -> float:
    reference = json.loads((SAMPLES / "call" / "reference.json").read_text())
    truth = [normalise(" ".join(r["text"] for r in reference if r["track"] == t)) for t in TRACKS]
    return jiwer.wer(truth, [normalise(texts[t]) for t in TRACKS])


def speaker(source: str) -> str:
    """The recording an utterance comes from, as named in samples/SOURCES.md."""
    if source == "two_cities":
        return "LibriVox Dickens (01-07)"
    return "CMU cards (08-12)" if source.startswith("cards/") else "CMU goforward/something (13-14)"


def per_speaker_wer(truth: list[str], heard: list[str], sources: list[str]) -> dict[str, str]:
    """Streamed WER of each source recording, with its word count."""
    out = {}
    for name in sorted({speaker(s) for s in sources}):
        pick = [i for i, s in enumerate(sources) if speaker(s) == name]
        words = sum(len(truth[i].split()) for i in pick)
        wer = jiwer.wer([truth[i] for i in pick], [heard[i] for i in pick])
        out[name] = f"{wer:.3f} over {words} words"
    return out


def utterance_wer(engine: OfflineEngine) -> tuple[float, float, list[str]]:
    """Streaming WER (20 ms pieces through the endpointer), one-shot WER (the
    whole clip decoded at once, no endpointer) and the streamed misses; prints
    the streamed WER per source recording."""
    listing = json.loads((SAMPLES / "utterances" / "transcripts.json").read_text())
    truth, heard, whole, misses = [], [], [], []
    for item in listing:
        pcm = read_pcm(SAMPLES / "utterances" / item["file"])
        stream = engine.open_stream(contact_id="bench", track="utt", language="en")
        hyps = run_stream(stream, pcm)
        truth.append(normalise(item["text"]))
        heard.append(normalise(" ".join(h.text for h in hyps if not h.is_partial)))
        audio = soxr.resample(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, 8000, 16000)
        whole.append(normalise(tidy(engine.model.transcribe(audio).text)))
        if heard[-1] != truth[-1]:
            misses.append(f"{item['file']}: {truth[-1]!r} -> {heard[-1]!r}")
    for name, result in per_speaker_wer(truth, heard, [i["source"] for i in listing]).items():
        print(f"  utterance set WER, {name}: {result}")
    return jiwer.wer(truth, heard), jiwer.wer(truth, whole), misses


@dataclass
class Feed:
    """One paced stream: its audio, when it starts, and what came back when."""

    stream: OfflineStream
    pcm: bytes
    delay: float
    sent: int = 0
    job: Future[list[Hypothesis]] | None = None
    closing: bool = False
    finished_at: float | None = None
    results: list[tuple[float, Hypothesis]] = field(default_factory=list)


def _service(feed: Feed, pool: ThreadPoolExecutor, now: float, origin: float) -> None:
    """Send the audio now due; collect a finished job; start the next one."""
    due = min(len(feed.pcm), int((now - origin - feed.delay) * BYTES_PER_SECOND) // 2 * 2)
    if due > feed.sent:
        feed.stream.send(feed.pcm[feed.sent : due])
        feed.sent = due
    if feed.job is not None and not feed.job.done():
        return
    if feed.job is not None:
        done_at = time.perf_counter()
        feed.results += [(done_at, h) for h in feed.job.result()]
        feed.job = None
        if feed.closing:
            feed.finished_at = done_at
            return
    if feed.sent == len(feed.pcm) and not feed.closing:
        feed.closing = True
        feed.job = pool.submit(feed.stream.close)
    elif feed.sent > 0 and not feed.closing:
        feed.job = pool.submit(feed.stream.poll)


def run_paced(engine: OfflineEngine, tracks: list[tuple[bytes, float]], workers: int) -> list[Feed]:
    """Feed every (pcm, start delay) at real-time pace in 20 ms ticks until all close."""
    feeds = [
        Feed(engine.open_stream(contact_id=f"c{i}", track="t", language="en"), pcm, delay)
        for i, (pcm, delay) in enumerate(tracks)
    ]
    origin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        tick = 0
        while any(f.finished_at is None for f in feeds):
            now = time.perf_counter()
            for feed in feeds:
                if feed.finished_at is None:
                    _service(feed, pool, now, origin)
            tick += 1
            time.sleep(max(0.0, origin + tick * 0.02 - time.perf_counter()))
    for feed in feeds:  # times relative to each stream's own first sample
        feed.results = [(t - origin - feed.delay, h) for t, h in feed.results]
        feed.finished_at = (feed.finished_at or 0.0) - origin - feed.delay
    return feeds


@dataclass(frozen=True)
class Latencies:
    """Per-utterance latencies in seconds and the worst end-of-audio backlog."""

    first_partial: list[float]
    final: list[float]
    backlog: float


def latencies(feeds: list[Feed]) -> Latencies:
    first: dict[tuple[int, str], float] = {}
    final: list[float] = []
    for n, feed in enumerate(feeds):
        for at, hyp in feed.results:
            if hyp.is_partial:
                first.setdefault((n, hyp.result_id), at - hyp.start_ms / 1000)
            elif hyp.text:
                final.append(at - hyp.end_ms / 1000)
    backlog = max((f.finished_at or 0.0) - len(f.pcm) / BYTES_PER_SECOND for f in feeds)
    return Latencies(list(first.values()), final, backlog)


def after_reference_end(feeds: list[Feed]) -> list[float]:
    """Final latency against the reference: time from the end of the last
    reference phrase a final overlaps (energy-detected speech, reference.json)
    to the final. Feeds are the call's tracks in TRACKS order."""
    reference = json.loads((SAMPLES / "call" / "reference.json").read_text())
    out: list[float] = []
    for track, feed in zip(TRACKS, feeds, strict=True):
        spans = [(r["start_ms"], r["end_ms"]) for r in reference if r["track"] == track]
        for at, hyp in feed.results:
            ends = [e for s, e in spans if s < hyp.end_ms and hyp.start_ms < e]
            if not hyp.is_partial and hyp.text and ends:
                out.append(at - max(ends) / 1000)
    return out


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f} s" if values else "n/a"


def sustains(engine: OfflineEngine, call: dict[str, bytes], n: int, seconds: float) -> Latencies:
    """N staggered tracks (alternately agent and customer) of `seconds` each, paced."""
    pcms = [p[: int(seconds * BYTES_PER_SECOND) // 2 * 2] for p in call.values()]
    tracks = [(pcms[i % 2], i * 0.37) for i in range(n)]
    return latencies(run_paced(engine, tracks, os.cpu_count() or 1))


def report_capacity(
    engine: OfflineEngine, call: dict[str, bytes], trials: int, seconds: float
) -> None:
    """Start at the target (TARGET_PER_CORE tracks a core), grow by 40% until a run fails."""
    cores = os.cpu_count() or 1
    n, best = TARGET_PER_CORE * cores, 0
    print(f"measuring capacity with partials from the target, {n} tracks on {cores} cores")
    for _ in range(trials):
        lat = sustains(engine, call, n, seconds)
        ok = lat.backlog < 2.0 and (not lat.final or np.percentile(lat.final, 90) < 3.0)
        print(
            f"  measured: {n:3d} paced tracks -> final latency p50 {pct(lat.final, 50)}, "
            f"p90 {pct(lat.final, 90)}, end backlog {lat.backlog:.2f} s: "
            f"{'sustained' if ok else 'NOT sustained'}; load average {os.getloadavg()[0]:.2f}"
        )
        if not ok:
            break
        best, n = n, int(n * 1.4) + 1
    if best:
        print(
            f"capacity measured: {best} live tracks ({best // 2} calls) sustained in real time "
            f"with partials = {best / cores:.1f} tracks per core"
        )
    else:
        print(f"capacity measured: fewer than {n} tracks ({n / cores:.1f} per core) sustained")


class LoadSampler:
    """The 1-minute load average, sampled every 5 s on a daemon thread."""

    def __init__(self) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        self._stop.set()
        return f"mean {np.mean(self.samples):.2f}, max {max(self.samples):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Offline engine benchmark")
    parser.add_argument("--trials", type=int, default=3, help="paced capacity runs")
    parser.add_argument("--seconds", type=float, default=30.0, help="audio per paced track")
    parser.add_argument("--latency-runs", type=int, default=2, help="paced runs of the call")
    args = parser.parse_args()
    print(f"cores {os.cpu_count()}; load average {os.getloadavg()}")
    load = LoadSampler()
    started = time.perf_counter()
    finals_only = OfflineEngine(partials=False)
    print(f"model load {time.perf_counter() - started:.1f} s")
    with_partials = OfflineEngine(partials=True)
    print(f"one model shared by both engines: {finals_only.model is with_partials.model}")
    call = {t: read_pcm(SAMPLES / "call" / name) for t, name in TRACKS.items()}
    rtf_finals, texts = measure_rtf(finals_only, call)
    rtf_partials, _ = measure_rtf(with_partials, call)
    print(f"sample call WER {call_wer(texts):.3f}")
    wer, one_shot, misses = utterance_wer(finals_only)
    print(
        f"utterance set WER {wer:.3f} streamed; {one_shot:.3f} one-shot (whole clip, no endpointer)"
    )
    for miss in misses:
        print(f"  streamed miss {miss}")
    print(
        f"RTF per stream, one core: finals only {rtf_finals:.3f}, with partials {rtf_partials:.3f}"
    )
    cores = os.cpu_count() or 1
    print(
        f"computed capacity (cores / RTF): finals only {int(cores / rtf_finals)} tracks, "
        f"with partials {int(cores / rtf_partials)} tracks"
    )
    firsts: list[float] = []
    finals: list[float] = []
    truth_ends: list[float] = []
    for _ in range(args.latency_runs):
        feeds = run_paced(with_partials, [(p, 0.0) for p in call.values()], 2)
        one_call = latencies(feeds)
        firsts += one_call.first_partial
        finals += one_call.final
        truth_ends += after_reference_end(feeds)
    print(
        f"one call paced in real time, {args.latency_runs} runs, {len(finals)} finals: "
        f"first partial after speech start p50 {pct(firsts, 50)} (p90 {pct(firsts, 90)}); "
        f"final after speech end p50 {pct(finals, 50)} (p90 {pct(finals, 90)}); "
        f"final after the reference phrase end p50 {pct(truth_ends, 50)} "
        f"(p90 {pct(truth_ends, 90)})"
    )
    report_capacity(with_partials, call, args.trials, args.seconds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB; 1-minute load average during the run {load.summary()}")


if __name__ == "__main__":
    main()
