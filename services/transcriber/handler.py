"""The transcriber's handler: routes each call's events to its transcription,
publishes the results, and saves how far each call got.

Resume after a takeover (with a progress store): after finals are published,
the call's `CallTranscription.progress()` is saved (at most every
`save_interval_s` per call, and when the call is done), and the consumer loop
is told, through `resume_point`, the record of the first chunk not wholly
covered by saved finals, so the shard's checkpoint can move past the rest of
the call. An instance that meets a call it does not hold loads its progress:
done calls are skipped, others restart the engine after their last final. A
call met mid-way (its CallStarted before the replay) with no progress saved
was settled before, or not transcribed (whose progress is saved at its
CallStarted), so it is skipped too: an enabled call without saved progress
keeps its CallStarted in the replay.

Commit after the effect: what the core emits waits in the call's outbox
until the sink has taken it; a failed publish (raised, so the loop retries
the record or the tick) leaves it there, and the next attempt publishes it
first. Progress is saved, and a call retired as done, only with its outbox
empty: the saved state never claims a final the stream does not hold.

Resume points only move forward in the shard: a call resumes at the
earliest shard position among the chunks its saved finals do not cover
(and its CallEnded, once seen), never at one chunk's position, since a
producer that retried part of a batch may have stored a later chunk first.

The handler passes the monotonic clock to the core, which decides retries
and keep-alives. A call is settled once its last segments and its CallEnded
are published.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from callstream.asr.port import SpeechEngine
from callstream.bus.ports import EventSink, Record
from callstream.errors import CallstreamError, stored_of
from callstream.events import (
    AudioChunkCaptured,
    CallEnded,
    CallStarted,
    Event,
    TranscriptSegmentProduced,
)
from callstream.progress import ProgressStore
from services.transcriber.core import CallTranscription
from services.transcriber.recovery import RecoveryPolicy

log = logging.getLogger(__name__)
_DONE_MEMORY = 10_000
Position = tuple[str, str]  # (shard id, sequence number) of a record


@dataclass
class _CallRecords:
    """Where a call's chunks are on the shard, and what of it is saved."""

    chunks: dict[tuple[str, int], Position] = field(default_factory=dict)
    last: Position | None = None
    ended: Position | None = None
    saved: dict[str, Any] | None = None
    save_pending: bool = False
    saved_at: float = float("-inf")


class TranscriberHandler:
    """Routes each call's events to its transcription and publishes the results."""

    def __init__(
        self,
        engine: SpeechEngine,
        sink: EventSink,
        default_language: str,
        policy: RecoveryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        progress: ProgressStore | None = None,
        save_interval_s: float = 1.0,
        done_memory: int = _DONE_MEMORY,
    ) -> None:
        self.engine = engine
        self.sink = sink
        self.default_language = default_language
        self.policy = policy or RecoveryPolicy()
        self.clock = clock
        self.progress = progress
        self.save_interval_s = save_interval_s
        self.calls: dict[str, CallTranscription] = {}
        self.records: dict[str, _CallRecords] = {}
        self.outbox: dict[str, list[Event]] = {}  # emitted, not yet published
        self.done: OrderedDict[str, None] = OrderedDict()  # bounded, oldest first
        self.done_memory = done_memory

    def handle(self, event: Event, record: Record) -> None:
        contact_id = getattr(event, "contact_id", None)
        if contact_id is None or contact_id in self.done:
            return
        call = self.calls.get(contact_id) or self._start(contact_id, event)
        if call is None:
            return
        self._remember(contact_id, event, record)
        self._publish(call, call.accept(event, self.clock()))
        if isinstance(event, CallStarted) and not call.enabled:
            self._save(call)  # a replay met mid-call must know it is not transcribed

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.done

    def resume_point(self, contact_id: str) -> Position | None:
        """The first record a restart needs: the earliest position of a chunk the
        saved finals do not cover (any track), or of the CallEnded once seen."""
        records = self.records.get(contact_id)
        if records is None or records.saved is None or records.last is None:
            return None
        firsts = _resume_sequences(records.saved)
        points = [
            position
            for (track, sequence), position in records.chunks.items()
            if records.saved["enabled"] and sequence >= firsts.get(track, 0)
        ]
        if records.ended is not None:
            points.append(records.ended)
        points = points or [records.last]  # all covered: what comes next is unread
        if len({shard for shard, _ in points}) > 1:
            return None  # the call crossed a reshard: keep its first record
        return min(points, key=lambda p: int(p[1]))

    def tick(self) -> None:
        for call in list(self.calls.values()):
            self._publish(call, call.poll(self.clock()))

    def forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            self.calls.pop(contact_id, None)
            self.records.pop(contact_id, None)
            self.outbox.pop(contact_id, None)  # the new owner replays what made it

    # --- calls met for the first time -----------------------------------------------

    def _start(self, contact_id: str, event: Event) -> CallTranscription | None:
        state = self.progress.load(contact_id) if self.progress is not None else None
        if state is not None and state["done"]:
            self._retire(contact_id)
            return None
        if state is None and self.progress is not None and not isinstance(event, CallStarted):
            log.info(
                "call met mid-way with no progress saved: finished before or not transcribed",
                extra={"contact_id": contact_id},
            )
            self._retire(contact_id)
            return None
        call = CallTranscription(contact_id, self.engine, self.default_language, self.policy)
        if state is not None:
            call.restore(state)
        self.calls[contact_id] = call
        self.records[contact_id] = _CallRecords(saved=state)
        return call

    def _remember(self, contact_id: str, event: Event, record: Record) -> None:
        records = self.records.setdefault(contact_id, _CallRecords())
        position = (record.shard_id, record.sequence_number)
        records.last = position
        if isinstance(event, AudioChunkCaptured):
            records.chunks.setdefault((event.track.value, event.sequence), position)
        elif isinstance(event, CallEnded) and records.ended is None:
            records.ended = position

    # --- results out, progress saved ----------------------------------------------

    def _publish(self, call: CallTranscription, events: list[Event]) -> None:
        """Publish the call's outbox with `events` appended; then save and retire.

        A failed publish raises with the outbox kept, less what the stream says it
        stored: the retry publishes the rest first (repeating nothing), and the core
        (which has moved on) is never asked again."""
        box = self.outbox.setdefault(call.contact_id, [])
        box.extend(events)
        records = self.records.get(call.contact_id)
        taken: list[Event] = []  # what the stream stored of the outbox
        try:
            if box:
                self.sink.publish(box)
                taken, self.outbox[call.contact_id] = box, []
        except CallstreamError as e:
            # What the stream took of it leaves the outbox: the retry repeats nothing.
            stored = stored_of(e, len(box))
            taken = [ev for ev, s in zip(box, stored, strict=True) if s]
            self.outbox[call.contact_id] = [ev for ev, s in zip(box, stored, strict=True) if not s]
            raise
        finally:
            if records is not None and any(_final(ev) for ev in taken):
                records.save_pending = True
        if records is not None and records.save_pending:
            self._save(call, due_only=True)
        if call.done:
            self._save(call)
            self.calls.pop(call.contact_id, None)
            self._retire(call.contact_id)

    def _save(self, call: CallTranscription, *, due_only: bool = False) -> None:
        """Save the call's progress (raises RetryableError: the loop retries)."""
        records = self.records.get(call.contact_id)
        if self.progress is None or records is None or self.outbox.get(call.contact_id):
            return
        now = self.clock()
        if due_only and now - records.saved_at < self.save_interval_s:
            return
        state = call.progress()
        self.progress.save(call.contact_id, state, _version(state))
        records.saved, records.saved_at, records.save_pending = state, now, False
        self._prune(records)

    def _prune(self, records: _CallRecords) -> None:
        """Forget where chunks before the saved resume points are: never needed again."""
        assert records.saved is not None
        firsts = _resume_sequences(records.saved)
        for key in [k for k in records.chunks if k[1] < firsts.get(k[0], 0)]:
            del records.chunks[key]

    def _retire(self, contact_id: str) -> None:
        self.records.pop(contact_id, None)
        self.outbox.pop(contact_id, None)
        self.done[contact_id] = None
        while len(self.done) > self.done_memory:
            self.done.popitem(last=False)


def _resume_sequences(state: dict[str, Any]) -> dict[str, int]:
    """Per track, the first chunk sequence the saved finals do not wholly cover."""
    return {track: saved["resume_sequence"] for track, saved in state["tracks"].items()}


def _version(state: dict[str, Any]) -> int:
    """Grows with every new final and once more when the call is done."""
    committed = sum(t["committed_ms"] + t["resume_sequence"] for t in state["tracks"].values())
    return 1 + 4 * committed + 2 * int(state["done"])


def _final(event: Event) -> bool:
    return isinstance(event, TranscriptSegmentProduced) and not event.is_partial
