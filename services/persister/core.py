"""Persister core: TranscriptSegmentProduced in, DynamoDB row writes out.

Pure. Rows follow the reference Lambda's layout: `ContactId` (hash key),
`StartTime` (range key, seconds), `EndTime`, `SegmentId`, `Transcript`,
`IsPartial`, `LoggedOn` (ISO-8601), `ExpiresAfter` (TTL, epoch seconds), plus
`Track`. Customer segments go to one table, agent segments to the other, as
the reference does. A final overwrites its partials (same key); a partial is
written only where no final stands (`only_over_partial`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from callstream.events import Event, Track, TranscriptSegmentProduced


@dataclass(frozen=True)
class PutRow:
    """Write one item; with `only_over_partial`, never replace a final."""

    table: str
    item: dict[str, Any]
    only_over_partial: bool


@dataclass(frozen=True)
class RowPolicy:
    """Which tables, and what to keep."""

    customer_table: str
    agent_table: str
    save_partials: bool
    ttl_days: int


def rows_for(event: Event, policy: RowPolicy, now_ms: int) -> list[PutRow]:
    """The writes one event needs (none for partials unless kept, none for other events)."""
    if not isinstance(event, TranscriptSegmentProduced):
        return []
    if event.is_partial and not policy.save_partials:
        return []
    if not event.transcript.strip():
        return []
    table = policy.customer_table if event.track is Track.FROM_CUSTOMER else policy.agent_table
    return [PutRow(table, segment_item(event, policy.ttl_days, now_ms), event.is_partial)]


def segment_item(event: TranscriptSegmentProduced, ttl_days: int, now_ms: int) -> dict[str, Any]:
    """The DynamoDB item (boto3 resource-style values) of one segment."""
    logged_on = datetime.fromtimestamp(now_ms / 1000, UTC)
    return {
        "ContactId": event.contact_id,
        "StartTime": _seconds(event.start_ms),
        "EndTime": _seconds(event.end_ms),
        "SegmentId": event.segment_id,
        "Transcript": event.transcript,
        "IsPartial": event.is_partial,
        "Track": event.track.value,
        "LoggedOn": logged_on.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ExpiresAfter": now_ms // 1000 + ttl_days * 86_400,
    }


def _seconds(ms: int) -> Decimal:
    return Decimal(ms) / Decimal(1000)
