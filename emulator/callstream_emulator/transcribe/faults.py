"""The fault ledger: faults waiting for the next streams, and what each stream saw."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from callstream_emulator.transcribe.errors import EXCEPTION_STATUS


@dataclass(frozen=True)
class Fault:
    """What goes wrong with one stream: a service exception, or a dropped connection.

    `after_audio_events=0` acts at start: an exception becomes an HTTP error
    response, a drop closes the connection before any response.
    `after_audio_ms`, when set, acts instead once that much audio (per
    channel) was taken in: unlike a count of events, it does not depend on
    how a loaded client batched its audio into events.
    """

    exception: str | None = None
    after_audio_events: int = 0
    drop_connection: bool = False
    message: str = "fault injected by the local Transcribe endpoint"
    after_audio_ms: int | None = None

    @property
    def at_start(self) -> bool:
        """The fault refuses the stream before any audio."""
        return self.after_audio_events == 0 and self.after_audio_ms is None

    def due(self, audio_events: int, audio_ms: int) -> bool:
        """Whether the fault strikes now, after this many events and ms of audio."""
        if self.after_audio_ms is not None:
            return audio_ms >= self.after_audio_ms
        return audio_events == self.after_audio_events

    def __post_init__(self) -> None:
        if self.drop_connection == (self.exception is not None):
            raise ValueError("a Fault either names an exception or drops the connection")
        if self.exception is not None and self.exception not in EXCEPTION_STATUS:
            known = ", ".join(sorted(EXCEPTION_STATUS))
            raise ValueError(f"unknown exception {self.exception!r}; expected one of {known}")
        if self.after_audio_events < 0:
            raise ValueError(f"after_audio_events must be >= 0, got {self.after_audio_events}")

    @classmethod
    def fail(
        cls,
        exception: str,
        *,
        after_audio_events: int = 0,
        after_audio_ms: int | None = None,
        message: str = "",
    ) -> Fault:
        """Fail the stream with the named service exception."""
        return cls(
            exception,
            after_audio_events,
            message=message or cls.message,
            after_audio_ms=after_audio_ms,
        )

    @classmethod
    def drop(cls, *, after_audio_events: int = 0, after_audio_ms: int | None = None) -> Fault:
        """Abort the stream's TCP connection (and so every stream sharing it)."""
        return cls(None, after_audio_events, drop_connection=True, after_audio_ms=after_audio_ms)


@dataclass
class StreamRecord:
    """What the endpoint saw of one stream, for assertions in tests."""

    session_id: str
    language_code: str
    sample_rate: int
    audio_events: int = 0
    audio_bytes: int = 0
    ended_by_client: bool = False
    fault: Fault | None = None
    channels: int = 1


class Ledger:
    """Faults waiting for streams and records of streams seen; shared across threads."""

    def __init__(self, faults: Iterable[Fault]) -> None:
        self._lock = threading.Lock()
        self._faults = deque(faults)
        self._records: list[StreamRecord] = []

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def take_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def add_record(self, record: StreamRecord) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[StreamRecord]:
        with self._lock:
            return [dataclasses.replace(record) for record in self._records]
