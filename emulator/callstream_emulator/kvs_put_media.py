"""One PutMedia connection: bytes in, stored fragments and ACK events out.

Pure of HTTP: the media endpoint feeds the request body here and streams the
returned ACK events back; fragments go into the store as they arrive (opened
when their Cluster starts, grown block by block, completed when the next one
starts), so GetMedia can stream them live. ACKs are the ones real KVS sends:
`{"EventType": "BUFFERING"|"RECEIVED"|"PERSISTED"|"ERROR", "FragmentTimecode": ..,
"FragmentNumber": ".."}`, with `ErrorId`/`ErrorCode` on ERROR.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from callstream.mkv.ebml import InvalidEbml
from callstream_emulator.kvs_fragmenter import (
    ClusterData,
    Fragmenter,
    FragmenterEvent,
    FragmentStarted,
    MediaFragment,
    TrailingTags,
)
from callstream_emulator.kvs_store import FragmentHead, FragmentStore, LiveFragment, StoredFragment

logger = logging.getLogger(__name__)

ABSOLUTE = "ABSOLUTE"
RELATIVE = "RELATIVE"
TIMECODE_TYPES = (ABSOLUTE, RELATIVE)
# ErrorId values of real KVS PutMedia ERROR acknowledgements.
INVALID_MKV_DATA = (4006, "INVALID_MKV_DATA")

Ack = dict[str, Any]


@dataclass
class _Pending:
    number: int
    server_ms: int
    timecode_ms: int
    live: LiveFragment


class PutMediaSession:
    """Turns one producer's byte stream into persisted fragments plus ACKs."""

    def __init__(
        self,
        store: FragmentStore,
        stream_arn: str,
        *,
        timecode_type: str,
        producer_start_ms: int,
        clock_ms: Callable[[], int],
    ) -> None:
        if timecode_type not in TIMECODE_TYPES:
            raise ValueError(f"timecode type must be ABSOLUTE|RELATIVE, got {timecode_type!r}")
        self._store = store
        self._arn = stream_arn
        self._relative = timecode_type == RELATIVE
        self._producer_start_ms = producer_start_ms
        self._clock_ms = clock_ms
        self._fragmenter = Fragmenter()
        self._pending: deque[_Pending] = deque()
        self.failed = False
        self.fragments_stored = 0

    def feed(self, data: bytes) -> list[Ack]:
        """Consume body bytes; after an ERROR ack, `failed` is set and input is ignored."""
        if self.failed:
            return []
        try:
            return self._handle(self._fragmenter.feed(data))
        except InvalidEbml as e:
            return [self._error(e)]

    def close(self) -> list[Ack]:
        """The producer ended its body: persist the last fragment."""
        if self.failed:
            return []
        try:
            return self._handle(self._fragmenter.close())
        except InvalidEbml as e:
            return [self._error(e)]

    def abandon(self) -> None:
        """The connection is over: drop a fragment left open (the producer broke off in it)."""
        while self._pending:
            self._store.abort(self._arn, self._pending.popleft().live)

    def _handle(self, events: list[FragmenterEvent]) -> list[Ack]:
        acks: list[Ack] = []
        for event in events:
            if isinstance(event, FragmentStarted):
                acks.append(self._started(event))
            elif isinstance(event, ClusterData):
                self._store.grow(self._arn, self._pending[-1].live, event.data)
            elif isinstance(event, TrailingTags):
                self._store.add_trailing(self._arn, self._pending[-1].live, event.tags)
            else:
                acks.extend(self._completed(event))
        return acks

    def _started(self, event: FragmentStarted) -> Ack:
        producer_ms = event.timecode_ms
        if self._relative:
            producer_ms += self._producer_start_ms
        head = FragmentHead(
            self._store.next_number(),
            self._clock_ms(),
            producer_ms,
            event.info,
            event.tracks,
            event.leading_tags,
        )
        live = self._store.open(self._arn, head, event.cluster_head)
        pending = _Pending(head.number, head.server_ms, event.timecode_ms, live)
        self._pending.append(pending)
        return _ack("BUFFERING", pending)

    def _completed(self, media: MediaFragment) -> list[Ack]:
        pending = self._pending.popleft()
        head = pending.live.head
        stored = StoredFragment(head.number, head.server_ms, head.producer_ms, media)
        self._store.complete(self._arn, pending.live, stored)
        self.fragments_stored += 1
        return [_ack("RECEIVED", pending), _ack("PERSISTED", pending)]

    def _error(self, error: InvalidEbml) -> Ack:
        self.failed = True
        logger.info("PutMedia on %s rejected: %s", self._arn, error)
        error_id, error_code = INVALID_MKV_DATA
        ack: Ack = {"EventType": "ERROR", "ErrorId": error_id, "ErrorCode": error_code}
        if self._pending:
            pending = self._pending[-1]
            ack["FragmentTimecode"] = pending.timecode_ms
            ack["FragmentNumber"] = str(pending.number)
        ack["Message"] = str(error)
        self.abandon()
        return ack


def _ack(event_type: str, pending: _Pending) -> Ack:
    return {
        "EventType": event_type,
        "FragmentTimecode": pending.timecode_ms,
        "FragmentNumber": str(pending.number),
    }
