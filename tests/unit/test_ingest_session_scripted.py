"""CallSession with a scripted media edge: corrupt, truncated and sparse streams, retries, idle."""

from __future__ import annotations

import logging
import random
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from callstream.errors import MediaStreamError, RetryableError
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream.mkv.writer import ConnectCallWriter
from services.ingest.media import ReadStalled
from services.ingest.session import CallSession

CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
ARN = "arn:aws:kinesisvideo:us-east-1:123456789012:stream/s/1700000000000"


def pcm(seconds: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(seconds * 16000))


def fragments(
    customer: bytes, agent: bytes, block_samples: int = 512, blocks: int = 16, unknown: bool = False
) -> list[bytes]:
    writer = ConnectCallWriter(CONTACT, "instance", 1_000_000, None, block_samples, blocks)
    step, parts = writer.fragment_bytes, []
    for index, offset in enumerate(range(0, len(customer), step)):
        number = str(10**46 + index)
        parts.append(
            writer.getmedia_fragment(
                customer[offset : offset + step],
                agent[offset : offset + step],
                fragment_number=number,
                server_ts=writer.position_ms / 1000,
                producer_ts=writer.position_ms / 1000,
                millis_behind_now=0,
                continuation_token=number,
                unknown_segment_size=unknown,
            )
        )
    return parts


@dataclass
class ScriptedMedia:
    """Each GetMedia connection plays the next script entry: bytes, then maybe an error."""

    connections: list[tuple[bytes, Exception | None]]
    region: str = "us-east-1"
    selectors: list[dict[str, Any]] = field(default_factory=list)

    def get_fragments(self, stream_arn: str, numbers: list[str]) -> Generator[bytes, None, None]:
        raise MediaStreamError("no archive in this test")
        yield b""  # pragma: no cover

    def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Generator[bytes, None, None]:
        self.selectors.append(selector)
        data, error = self.connections.pop(0) if self.connections else (b"", None)
        for i in range(0, len(data), 1500):
            yield data[i : i + 1500]
        if error is not None:
            raise error

    def endpoint_stale(self, stream_arn: str, api: str = "GET_MEDIA") -> bool:
        return False

    def release(self, stream_arn: str) -> None:
        pass


@dataclass
class ListSink:
    stream: str = "audio"
    events: list[Event] = field(default_factory=list)

    def publish(self, events: Any) -> None:
        self.events.extend(events)

    def pcm(self, track: Track) -> bytes:
        chunks = [e for e in self.events if isinstance(e, AudioChunkCaptured) and e.track is track]
        assert [c.sequence for c in chunks] == list(range(len(chunks)))
        return b"".join(c.pcm for c in chunks)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(media: ScriptedMedia, **options: Any) -> tuple[CallEnded, ListSink]:
    sink = ListSink()
    call = CallStarted(contact_id=CONTACT, stream_arn=ARN, requested_at_ms=0)
    clock = FakeClock()
    session = CallSession(
        call,
        media,
        sink,
        128,
        monotonic=options.pop("monotonic", clock),
        sleep=clock.sleep,
        **options,
    )
    return session.run(), sink


def test_corrupt_media_is_logged_with_the_contact_and_reading_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    customer, agent = pcm(4.0, 1), pcm(4.0, 2)
    parts = fragments(customer, agent)
    damaged = bytearray(parts[1])
    damaged[damaged.find(b"\x1f\x43\xb6\x75")] ^= 0xFF
    media = ScriptedMedia([(parts[0] + bytes(damaged) + parts[2] + parts[3], None)])
    with caplog.at_level(logging.WARNING):
        ended, sink = run(media)
    assert ended.reason is EndReason.END_OF_STREAM and ended.stream_errors >= 1
    assert sink.pcm(Track.FROM_CUSTOMER) == customer[:16384] + customer[32768:]
    warned = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert warned and all(getattr(r, "contact_id", None) == CONTACT for r in warned)
    assert "byte" in warned[0].getMessage()


def test_a_stream_truncated_mid_block_keeps_every_frame_before_the_cut() -> None:
    customer, agent = pcm(2.048, 3), pcm(2.048, 4)
    parts = fragments(customer, agent)
    media = ScriptedMedia([(parts[0] + parts[1][: len(parts[1]) // 2], None)])
    ended, sink = run(media)
    got = sink.pcm(Track.FROM_CUSTOMER)
    assert ended.reason is EndReason.END_OF_STREAM and ended.stream_errors == 1
    assert customer.startswith(got) and len(got) >= 16384 + 4096


def test_sparse_fragments_like_the_kvs_fixture_carry_their_gaps() -> None:
    # As output_get_media_sparse_fragments.mkv: 2 s fragments, only 1, 3 and 5
    # kept, so Cluster timecodes step 0, 4000, 8000.
    customer, agent = pcm(10.0, 5), pcm(10.0, 6)
    parts = fragments(customer, agent, block_samples=400, blocks=40)
    media = ScriptedMedia([(parts[0] + parts[2] + parts[4], None)])
    ended, sink = run(media)
    assert ended.reason is EndReason.END_OF_STREAM
    step = 32000
    kept = slice(0, step), slice(2 * step, 3 * step), slice(4 * step, 5 * step)
    assert sink.pcm(Track.FROM_CUSTOMER) == b"".join(customer[s] for s in kept)
    assert sink.pcm(Track.TO_CUSTOMER) == b"".join(agent[s] for s in kept)
    for track in Track:
        chunks = [e for e in sink.events if isinstance(e, AudioChunkCaptured) and e.track is track]
        gapped = [(c.start_time_ms - 1_000_000, c.gap_before_ms) for c in chunks if c.gap_before_ms]
        assert gapped == [(4000, 2000), (8000, 2000)]
        # Every chunk's wall-clock place follows from its own fields.
        assert all(c.offset_ms + c.gap_total_ms == c.start_time_ms - 1_000_000 for c in chunks)


def test_resumes_with_the_last_continuation_token() -> None:
    customer, agent = pcm(4.0, 7), pcm(4.0, 8)
    parts = fragments(customer, agent)
    media = ScriptedMedia(
        [
            (parts[0] + parts[1][:9000], RetryableError("connection reset")),
            (b"".join(parts[1:]), None),
        ]
    )
    ended, sink = run(media)
    assert media.selectors[1] == {
        "StartSelectorType": "CONTINUATION_TOKEN",
        "ContinuationToken": str(10**46),
    }
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert ended.reconnects == 1


def test_a_body_that_ends_inside_a_fragment_is_resumed() -> None:
    customer, agent = pcm(4.0, 12), pcm(4.0, 13)
    parts = fragments(customer, agent)
    media = ScriptedMedia([(parts[0] + parts[1][:20_000], None), (b"".join(parts[1:]), None)])
    ended, sink = run(media)
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert sink.pcm(Track.TO_CUSTOMER) == agent
    assert ended.reconnects == 1 and ended.reason is EndReason.END_OF_STREAM


def test_a_body_that_ends_with_the_kvs_error_tag_is_resumed() -> None:
    from callstream.mkv.writer import kvs_tags

    customer, agent = pcm(3.0, 14), pcm(3.0, 15)
    parts = fragments(customer, agent, unknown=True)  # the error tags end the open Segment
    error = kvs_tags([("AWS_KINESISVIDEO_ERROR_CODE", "4000"), ("AWS_KINESISVIDEO_ERROR_ID", "x")])
    media = ScriptedMedia([(parts[0] + error, None), (b"".join(parts[1:]), None)])
    ended, sink = run(media)
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert ended.reconnects == 1 and ended.stream_errors == 0


def test_start_selector_now_ignores_the_start_fragment() -> None:
    parts = fragments(pcm(1.0, 16), pcm(1.0, 17))
    media = ScriptedMedia([(parts[0], None)])
    sink = ListSink()
    call = CallStarted(CONTACT, ARN, 0, start_fragment_number=str(10**46))
    CallSession(call, media, sink, 128, start_selector_type="NOW").run()
    assert media.selectors == [{"StartSelectorType": "NOW"}]


def test_gives_up_with_error_after_repeated_failures_without_progress() -> None:
    media = ScriptedMedia([(b"", RetryableError("refused"))] * 10)
    ended, _ = run(media, max_failures=3, idle_timeout_s=1e9)
    assert ended.reason is EndReason.ERROR and "refused" in ended.detail


def test_silence_ends_the_call_after_the_idle_timeout() -> None:
    customer, agent = pcm(2.0, 9), pcm(2.0, 10)
    parts = fragments(customer, agent)
    clock = FakeClock()

    class QuietMedia(ScriptedMedia):
        def get_media(
            self, stream_arn: str, selector: dict[str, Any]
        ) -> Generator[bytes, None, None]:
            clock.now += 5  # each stalled read waited out its read timeout
            yield from super().get_media(stream_arn, selector)

    media = QuietMedia([(parts[0] + parts[1], ReadStalled("quiet"))])
    media.connections += [(b"", ReadStalled("quiet"))] * 20
    ended, sink = run(media, idle_timeout_s=12, monotonic=clock)
    assert ended.reason is EndReason.IDLE_TIMEOUT
    assert sink.pcm(Track.FROM_CUSTOMER) == customer
    assert 2 <= ended.reconnects <= 3


def test_a_long_call_runs_in_bounded_memory() -> None:
    import tracemalloc

    minutes = 4  # long enough for any per-fragment growth to show
    piece = pcm(1.024, 11)

    class LiveCall(ScriptedMedia):
        def get_media(
            self, stream_arn: str, selector: dict[str, Any]
        ) -> Generator[bytes, None, None]:
            writer = ConnectCallWriter(CONTACT, "instance", 1_000_000)
            for index in range(int(minutes * 60 / 1.024)):
                number = str(10**46 + index)
                yield writer.getmedia_fragment(
                    piece,
                    piece,
                    fragment_number=number,
                    server_ts=0,
                    producer_ts=0,
                    millis_behind_now=0,
                    continuation_token=number,
                )

    class CountingSink(ListSink):
        chunks = 0

        def publish(self, events: Any) -> None:
            self.chunks += sum(isinstance(e, AudioChunkCaptured) for e in events)

    sink = CountingSink()
    session = CallSession(
        CallStarted(contact_id=CONTACT, stream_arn=ARN, requested_at_ms=0), LiveCall([]), sink, 128
    )
    tracemalloc.start()
    try:
        ended = session.run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ended.reason is EndReason.END_OF_STREAM
    assert sink.chunks == 2 * 8 * int(minutes * 60 / 1.024)
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.2f} MiB"


def test_call_ended_is_published_alone_after_every_chunk_before_it() -> None:
    # In one batch a kill could store the CallEnded but not a chunk before it.
    class BatchSink(ListSink):
        batches: list[list[Event]]

        def publish(self, events: Any) -> None:
            self.batches = [*getattr(self, "batches", []), list(events)]
            super().publish(events)

    customer, agent = pcm(4.0, 7), pcm(4.0, 8)
    parts = fragments(customer, agent)
    cut = RetryableError("connection reset")  # then no more media: the call ends mid-fragment
    media = ScriptedMedia([(parts[0] + parts[1][:9000], cut), (b"", cut), (b"", cut)])
    sink = BatchSink()
    call = CallStarted(contact_id=CONTACT, stream_arn=ARN, requested_at_ms=0)
    clock = FakeClock()
    session = CallSession(call, media, sink, 128, monotonic=clock, sleep=clock.sleep)
    session.max_failures = 1
    ended = session.run()
    assert ended.reason is EndReason.ERROR
    ends = [b for b in sink.batches if any(isinstance(e, CallEnded) for e in b)]
    assert len(ends) == 1 and len(ends[0]) == 1 and sink.batches[-1] == ends[0]
    flushed = sink.batches[-2]  # the part of the cut fragment still buffered at the end
    assert flushed and all(isinstance(e, AudioChunkCaptured) for e in flushed)
