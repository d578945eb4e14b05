"""Ingest core takeover: export, restore and advance give exactly an undisturbed run's chunks.

A call's GetMedia bytes are decoded once into MKV events; an undisturbed core
gives the reference chunks. Then the call is cut after every MKV event (at
fragment boundaries and inside fragments), its state exported (through JSON,
as it is stored), restored in a fresh core, and the stream read again from
where a new GetMedia would start; the chunks published before the cut plus
those after must be the reference, no more, no less.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream.mkv.reader import MkvStreamReader
from callstream.mkv.reports import ClusterEnded, TagsRead
from callstream.mkv.writer import ConnectCallWriter
from services.ingest.core import CallIngest, advance

CONTACT = "87718f4a-d2ed-476a-ad11-f496ab09b3f8"
FIRST = 10**46


def pcm(seconds: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(seconds * 16000))


def mkv_events(keep: list[int] | None = None, seconds: float = 4.0) -> list[Any]:
    """GetMedia of a call (fragments of 1.024 s), as MKV events; `keep`: fragment indexes kept."""
    customer, agent = pcm(seconds, 1), pcm(seconds, 2)
    writer = ConnectCallWriter(CONTACT, "instance", 1_000_000)
    step, body = writer.fragment_bytes, b""
    for index, offset in enumerate(range(0, len(customer), step)):
        number = str(FIRST + index)
        fragment = writer.getmedia_fragment(
            customer[offset : offset + step],
            agent[offset : offset + step],
            fragment_number=number,
            server_ts=0,
            producer_ts=0,
            millis_behind_now=0,
            continuation_token=number,
        )
        if keep is None or index in keep:
            body += fragment
    reader = MkvStreamReader()
    return reader.feed(body) + reader.close()


def feed(core: CallIngest, events: list[Any]) -> list[Event]:
    out: list[Event] = []
    for event in events:
        out.extend(core.accept(event))
    return out


def chunks(events: list[Event]) -> list[AudioChunkCaptured]:
    return [e for e in events if isinstance(e, AudioChunkCaptured)]


def fragment_starts(events: list[Any]) -> dict[str, int]:
    """Index of the first MKV event of each fragment (its EBML header), by fragment number."""
    starts, header = {}, 0
    for index, event in enumerate(events):
        if type(event).__name__ == "EbmlHeaderRead" or index == 0:
            header = index
        if isinstance(event, TagsRead):
            for name, value in event.tags:
                if name == "AWS_KINESISVIDEO_FRAGMENT_NUMBER":
                    starts.setdefault(value, header)
    return starts


def reread_from(events: list[Any], state: dict[str, Any]) -> list[Any]:
    """What GetMedia sends on resume: from the fragment after the last completed one."""
    starts = fragment_starts(events)
    after = state["last_completed_fragment"]
    later = [n for n in starts if after is None or int(n) > int(after)]
    return events[starts[min(later, key=int)] :] if later else []


def stored(state: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(state))
    return result


@pytest.mark.parametrize("keep", [None, [0, 2, 3]], ids=["contiguous", "fragment-missing"])
def test_a_call_cut_anywhere_and_restored_publishes_exactly_the_undisturbed_chunks(
    keep: list[int] | None,
) -> None:
    events = mkv_events(keep)
    reference = chunks(feed(CallIngest(CONTACT), events))
    assert len(reference) > 40
    for cut in range(len(events) + 1):
        first = CallIngest(CONTACT)
        before = chunks(feed(first, events[:cut]))
        state = stored(first.export())
        second = CallIngest.restore(state)
        after = chunks(feed(second, reread_from(events, state)))
        assert before + after == reference, f"cut after MKV event {cut}"


def test_restored_call_reads_from_the_stream_start_without_repeating() -> None:
    events = mkv_events()
    reference = chunks(feed(CallIngest(CONTACT), events))
    for cut in range(0, len(events), 7):
        first = CallIngest(CONTACT)
        before = chunks(feed(first, events[:cut]))
        after = chunks(feed(CallIngest.restore(stored(first.export())), events))
        assert before + after == reference, f"cut after MKV event {cut}"


def test_export_at_a_fragment_end_holds_the_counters_and_the_token() -> None:
    events = mkv_events()
    core = CallIngest(CONTACT)
    end = [i for i, e in enumerate(events) if isinstance(e, ClusterEnded)][1]
    feed(core, events[: end + 1])
    state = core.export()
    assert state["last_completed_fragment"] == state["fragment_number"] == str(FIRST + 1)
    assert state["continuation_token"] == str(FIRST)  # the token tag follows the Cluster
    assert state["fragments"] == 2 and state["call_start_time_ms"] == 1_000_000
    for name in (Track.FROM_CUSTOMER.value, Track.TO_CUSTOMER.value):
        track = state["tracks"][name]
        assert track["sequence"] == 16 and track["sample_offset"] == 2 * 8192
        assert track["next_time_ms"] == 1_000_000 + 2048 and track["fragment_bytes"] == 16384


def test_restore_refuses_a_state_of_another_format() -> None:
    state = CallIngest(CONTACT).export()
    state["format"] = 99
    with pytest.raises(ValueError, match="format"):
        CallIngest.restore(state)


@pytest.mark.parametrize("keep", [None, [0, 2, 3]], ids=["contiguous", "fragment-missing"])
def test_advance_past_chunks_a_dead_owner_published_after_its_last_save(
    keep: list[int] | None,
) -> None:
    events = mkv_events(keep)
    reference = chunks(feed(CallIngest(CONTACT), events))
    for cut in range(len(events) + 1):
        core, published, saved = CallIngest(CONTACT), [], stored(CallIngest(CONTACT).export())
        unsaved: list[Event] = []
        for event in events[:cut]:
            out = core.accept(event)
            published += chunks(out)
            unsaved += out
            if isinstance(event, ClusterEnded):
                saved, unsaved = stored(core.export()), []
        found = [CallStarted(CONTACT, "arn", 0), *unsaved, CallStarted("other", "arn", 0)]
        state = stored(advance(saved, CONTACT, found))
        after = chunks(feed(CallIngest.restore(state), reread_from(events, state)))
        assert published + after == reference, f"died after MKV event {cut}"
        assert state["started"] is True


def test_advance_with_no_saved_state_starts_from_the_call_start() -> None:
    events = mkv_events()
    reference = chunks(feed(CallIngest(CONTACT), events))
    cut = len(events) // 2
    published = chunks(feed(CallIngest(CONTACT), events[:cut]))
    state = stored(advance(None, CONTACT, published))
    after = chunks(feed(CallIngest.restore(state), reread_from(events, state)))
    assert published + after == reference
    assert state["call_start_time_ms"] == 1_000_000


def test_advance_marks_the_call_ended_when_its_call_ended_was_published() -> None:
    events = mkv_events(seconds=2.0)
    core = CallIngest(CONTACT)
    out = feed(core, events) + core.finish(EndReason.END_OF_STREAM, "done", 0)
    assert isinstance(out[-1], CallEnded)
    assert advance(None, CONTACT, out)["ended"] is True
    assert advance(None, CONTACT, chunks(out))["ended"] is False


def key(chunk: AudioChunkCaptured) -> tuple[str, int]:
    return chunk.track.value, chunk.sequence


def assert_exactly_the_reference(
    published: list[AudioChunkCaptured], reference: list[AudioChunkCaptured], where: str
) -> None:
    """Every reference chunk published once, nothing else (the stream's order is not checked)."""
    keys = [key(c) for c in published]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    assert not repeated, f"{where}: published twice {repeated}"
    assert sorted(published, key=key) == sorted(reference, key=key), where


def holes(batch: list[AudioChunkCaptured]) -> dict[str, list[AudioChunkCaptured]]:
    """What a kill may have stored of a batch: one or two records lost, a later one stored."""
    out = {"first": batch[1:], "first-two": batch[2:], "next-to-last": batch[:-2] + batch[-1:]}
    return {name: kept for name, kept in out.items() if 0 < len(kept) < len(batch)}


def run_until_killed(events: list[Any], cut: int) -> tuple[list[Any], dict[str, Any], list[Any]]:
    """Saved fragment by fragment up to `cut`: (published before the last save, save, unsaved)."""
    core, published = CallIngest(CONTACT), []
    saved, unsaved = stored(core.export()), []
    for event in events[:cut]:
        unsaved += chunks(core.accept(event))
        if isinstance(event, ClusterEnded):
            published, saved, unsaved = published + unsaved, stored(core.export()), []
    return published, saved, unsaved


@pytest.mark.parametrize("keep", [None, [0, 2, 3]], ids=["contiguous", "fragment-missing"])
def test_a_hole_in_the_last_batch_publishes_only_the_missing_chunks(
    keep: list[int] | None,
) -> None:
    events = mkv_events(keep)
    reference = chunks(feed(CallIngest(CONTACT), events))
    tried = 0
    for cut in range(len(events) + 1):
        published, saved, batch = run_until_killed(events, cut)
        for name, kept in holes(batch).items():
            state = stored(advance(saved, CONTACT, [CallStarted(CONTACT, "arn", 0), *kept]))
            core = CallIngest.restore(state)
            after = chunks(feed(core, reread_from(events, state)))
            after += chunks(core.finish(EndReason.END_OF_STREAM, "done", 0))
            where = f"died after MKV event {cut}, lost the {name} of the batch"
            assert_exactly_the_reference(published + kept + after, reference, where)
            pruned = core.export()["tracks"].values()
            assert all(not t.get("on_stream") for t in pruned), f"{where}: not pruned"
            tried += 1
    assert tried > 100


def test_a_second_owner_killed_before_its_first_save_keeps_what_lay_beyond_the_hole() -> None:
    events = mkv_events()
    reference = chunks(feed(CallIngest(CONTACT), events))
    end = [i for i, e in enumerate(events) if isinstance(e, ClusterEnded)][1]
    published, saved, batch = run_until_killed(events, end)  # the second fragment unsaved
    kept = batch[2:]
    first = stored(advance(saved, CONTACT, kept))
    # The second owner publishes the two missing chunks, then dies before saving; the
    # third reads back from after the first advance: the chunks beyond the hole are older.
    second = CallIngest.restore(first)
    reread = len(events) - len(reread_from(events, first))
    missing = chunks(feed(second, events[reread:end]))
    assert sorted(map(key, missing)) == sorted(map(key, batch[:2])), "not only the hole"
    state = stored(advance(first, CONTACT, missing))
    core = CallIngest.restore(state)
    after = chunks(feed(core, reread_from(events, state)))
    assert_exactly_the_reference(published + kept + missing + after, reference, "third owner")


def test_old_states_without_on_stream_still_restore() -> None:
    events = mkv_events(seconds=2.0)
    core = CallIngest(CONTACT)
    feed(core, events[: len(events) // 2])
    state = stored(core.export())
    for track in state["tracks"].values():
        del track["on_stream"]
    restored = CallIngest.restore(state)
    assert all(not s.on_stream for s in restored.tracks.values())
    assert advance(state, CONTACT, [])["tracks"].keys() == state["tracks"].keys()


def test_a_call_ended_stored_past_a_hole_ends_the_call_and_says_what_is_missing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = mkv_events(seconds=2.0)
    for cut in range(len(events) - 1, 0, -1):  # the stream stops part-way through a chunk
        core = CallIngest(CONTACT)
        feed(core, events[:cut])
        if len(core.tracks) == 2 and all(t.buffer for t in core.tracks.values()):
            break
    saved = stored(core.export())
    last = core.finish(EndReason.IDLE_TIMEOUT, "idle", 0)
    assert len(last) > 2
    state = advance(saved, CONTACT, last[1:])
    assert state["ended"] is True
    assert "are not on the stream" in caplog.text
