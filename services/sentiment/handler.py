"""The sentiment service's handler: scores each final segment, stores its row, then commits.

A row is written before its record is checkpointed; the scorer's and the
table's AWS errors arrive classified (`adapters`, `engines`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from callstream.bus.ports import Record
from callstream.events import Event
from services.sentiment.adapters import SentimentTable
from services.sentiment.core import Scorer, row_for
from services.sentiment.settings import SentimentSettings


class SentimentHandler:
    """Scores each final segment and writes its row before the record is checkpointed."""

    def __init__(
        self,
        settings: SentimentSettings,
        scorer: Scorer,
        dynamodb: Any,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.scorer = scorer
        self.table = SentimentTable(dynamodb, settings.table)
        self.clock = clock  # ExpiresAfter of the rows

    def handle(self, event: Event, record: Record) -> None:
        now_ms = int(self.clock() * 1000)
        rows = row_for(event, self.scorer, self.settings.table, self.settings.ttl_days, now_ms)
        for row in rows:
            self.table.put(row.item)

    def is_settled(self, contact_id: str) -> bool:
        return True

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None
