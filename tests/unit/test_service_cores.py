"""Recorder, persister and transcriber cores, without any stream or AWS."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from callstream.asr.port import Hypothesis
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    EndReason,
    Track,
    TranscriptSegmentProduced,
)
from services.persister.core import RowPolicy, rows_for
from services.recorder.core import CallRecording
from services.recorder.wav import wav_header
from services.transcriber.core import CallTranscription

C = "contact-1"


def _chunk(
    track: Track, seq: int, pcm: bytes, start_ms: int = 1_700_000_000_000
) -> AudioChunkCaptured:
    offset = seq * len(pcm) // 2
    return AudioChunkCaptured(C, track, seq, offset, offset // 8, start_ms + offset // 8, pcm, "1")


def _ended(**counts: int) -> CallEnded:
    return CallEnded(
        C, EndReason.END_OF_STREAM, 0, chunk_counts=counts, call_start_time_ms=1_700_000_000_000
    )


# --- recorder -----------------------------------------------------------------
def test_recording_places_out_of_order_and_duplicate_chunks_by_offset() -> None:
    rec = CallRecording(C, "rec/")
    chunks = [_chunk(Track.FROM_CUSTOMER, i, bytes([i]) * 256) for i in range(4)]
    writes = []
    for chunk in [chunks[2], chunks[0], chunks[2], chunks[3], chunks[1]]:
        writes += rec.accept(chunk)
    assert sorted((w.byte_offset, w.pcm[0]) for w in writes) == [(i * 256, i) for i in range(4)]
    assert rec.uploads() == []


def test_recording_uploads_only_when_every_counted_chunk_has_arrived() -> None:
    rec = CallRecording(C, "rec/")
    rec.accept(_chunk(Track.TO_CUSTOMER, 0, b"\x01" * 256))
    rec.accept(_ended(AUDIO_TO_CUSTOMER=2))
    assert rec.uploads() == []
    rec.accept(_chunk(Track.TO_CUSTOMER, 1, b"\x02" * 256))
    (upload,) = rec.uploads()
    assert upload.pcm_bytes == 512
    assert upload.key == f"rec/{C}_2023-11-14T22:13:20.000Z_AUDIO_TO_CUSTOMER.wav"
    rec.mark_uploaded()
    assert rec.uploads() == []


def test_wav_header_describes_8khz_16bit_mono() -> None:
    header = wav_header(1000)
    assert header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt "
    assert struct.unpack("<HHIIHH", header[20:36]) == (1, 1, 8000, 16000, 2, 16)
    assert struct.unpack("<I", header[40:44]) == (1000,)


# --- persister ----------------------------------------------------------------
POLICY = RowPolicy("customer", "agent", save_partials=False, ttl_days=7)


def _segment(track: Track, partial: bool, text: str = "hi") -> TranscriptSegmentProduced:
    return TranscriptSegmentProduced(C, track, f"{C}:{track.value}:1500", 1500, 2750, text, partial)


def test_rows_follow_the_reference_layout_and_route_by_track() -> None:
    (row,) = rows_for(_segment(Track.TO_CUSTOMER, False), POLICY, now_ms=1_000_000)
    assert row.table == "agent" and not row.only_over_partial
    item = row.item
    assert (
        item["ContactId"] == C
        and str(item["StartTime"]) == "1.5"
        and str(item["EndTime"]) == "2.75"
    )
    assert item["IsPartial"] is False and item["Transcript"] == "hi"
    assert item["ExpiresAfter"] == 1000 + 7 * 86400 and item["LoggedOn"].endswith("Z")
    assert rows_for(_segment(Track.FROM_CUSTOMER, False), POLICY, 0)[0].table == "customer"


def test_partials_are_kept_only_when_asked_and_never_over_a_final() -> None:
    assert rows_for(_segment(Track.FROM_CUSTOMER, True), POLICY, 0) == []
    keep = RowPolicy("customer", "agent", save_partials=True, ttl_days=7)
    (row,) = rows_for(_segment(Track.FROM_CUSTOMER, True), keep, 0)
    assert row.only_over_partial


# --- transcriber --------------------------------------------------------------
@dataclass
class ScriptedStream:
    """Test double: one partial per chunk sent, one final at close."""

    sent: list[bytes] = field(default_factory=list)
    ready: list[Hypothesis] = field(default_factory=list)

    def send(self, pcm: bytes) -> None:
        self.sent.append(pcm)
        ms = sum(len(p) for p in self.sent) // 16
        self.ready.append(Hypothesis("r1", 100 + len(self.sent), ms, f"w{len(self.sent)}", True))

    def poll(self) -> list[Hypothesis]:
        out, self.ready = self.ready, []
        return out

    def close(self) -> list[Hypothesis]:
        ms = sum(len(p) for p in self.sent) // 16
        return [*self.poll(), Hypothesis("r1", 90, ms, "all words", False)]


class ScriptedEngine:
    name = "scripted"

    def __init__(self) -> None:
        self.streams: dict[str, ScriptedStream] = {}

    def open_stream(self, *, contact_id: str, track: str, language: str) -> ScriptedStream:
        return self.streams.setdefault(track, ScriptedStream())


def test_transcription_orders_chunks_and_pins_segment_start_across_partials() -> None:
    engine = ScriptedEngine()
    call = CallTranscription(C, engine)
    chunks = [_chunk(Track.FROM_CUSTOMER, i, bytes([i]) * 320) for i in range(3)]
    out = []
    for event in [chunks[1], chunks[0], chunks[1], chunks[2], _ended(AUDIO_FROM_CUSTOMER=3)]:
        out += call.accept(event)
    assert engine.streams["AUDIO_FROM_CUSTOMER"].sent == [c.pcm for c in chunks]
    segments = [e for e in out if isinstance(e, TranscriptSegmentProduced)]
    assert {s.segment_id for s in segments} == {f"{C}:AUDIO_FROM_CUSTOMER:101"}
    assert segments[-1].transcript == "all words" and not segments[-1].is_partial
    assert isinstance(out[-1], CallEnded) and call.done


def test_disabled_transcription_forwards_call_end_without_segments() -> None:
    engine = ScriptedEngine()
    call = CallTranscription(C, engine)
    started = CallStarted(C, "arn", 0, transcription_enabled=False)
    out = call.accept(started) + call.accept(_chunk(Track.TO_CUSTOMER, 0, b"\x00" * 320))
    out += call.accept(_ended(AUDIO_TO_CUSTOMER=1))
    assert engine.streams == {} and len(out) == 1 and isinstance(out[0], CallEnded)


def test_recording_keeps_wall_clock_timing_across_a_kvs_gap() -> None:
    rec = CallRecording(C, "rec/")
    first = _chunk(Track.FROM_CUSTOMER, 0, b"\x01" * 256)
    after_gap = AudioChunkCaptured(
        C,
        Track.FROM_CUSTOMER,
        1,
        128,
        16,
        1_700_000_002_016,
        b"\x02" * 256,
        "3",
        gap_before_ms=2000,
        gap_total_ms=2000,
    )
    writes = rec.accept(first) + rec.accept(after_gap)
    assert [w.byte_offset for w in writes] == [0, (128 + 2000 * 8) * 2]
    rec.accept(_ended(AUDIO_FROM_CUSTOMER=2))
    (upload,) = rec.uploads()
    assert upload.pcm_bytes == (128 + 16000 + 128) * 2
