"""The events services exchange, as plain frozen dataclasses.

Field names mirror the Avro schemas in `schemas/` one to one; `contract.py`
turns these into Avro single-object records and back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar


class Track(StrEnum):
    """Which side of the call a piece of audio or text belongs to."""

    FROM_CUSTOMER = "AUDIO_FROM_CUSTOMER"
    TO_CUSTOMER = "AUDIO_TO_CUSTOMER"

    @property
    def speaker(self) -> str:
        """Human name of the side: the customer speaks FROM_CUSTOMER audio."""
        return "customer" if self is Track.FROM_CUSTOMER else "agent"


class EndReason(StrEnum):
    """Why a call ended."""

    CONTACT_CHANGED = "CONTACT_CHANGED"
    END_OF_STREAM = "END_OF_STREAM"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    NO_AUDIO_TRACK = "NO_AUDIO_TRACK"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class CallStarted:
    """A contact's media stream is ready to be read."""

    schema_name: ClassVar[str] = "callstream.events.CallStarted"
    contact_id: str
    stream_arn: str
    requested_at_ms: int
    start_fragment_number: str | None = None
    transcription_enabled: bool = True
    language_code: str = "en-US"
    instance_id: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AudioChunkCaptured:
    """A run of one track's 8 kHz s16le PCM."""

    schema_name: ClassVar[str] = "callstream.events.AudioChunkCaptured"
    contact_id: str
    track: Track
    sequence: int
    sample_offset: int
    offset_ms: int
    start_time_ms: int
    pcm: bytes
    fragment_number: str
    sample_rate: int = 8000
    gap_before_ms: int = 0
    gap_total_ms: int = 0

    @property
    def end_sample(self) -> int:
        """Sample offset just past this chunk."""
        return self.sample_offset + len(self.pcm) // 2


@dataclass(frozen=True, slots=True)
class CallEnded:
    """No more audio will come for this contact."""

    schema_name: ClassVar[str] = "callstream.events.CallEnded"
    contact_id: str
    reason: EndReason
    ended_at_ms: int
    detail: str = ""
    last_fragment_number: str | None = None
    chunk_counts: dict[str, int] = field(default_factory=dict)
    call_start_time_ms: int | None = None
    stream_errors: int = 0
    reconnects: int = 0


@dataclass(frozen=True, slots=True)
class WordTiming:
    """A recognised word with call-relative times."""

    content: str
    start_ms: int
    end_ms: int
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class TranscriptSegmentProduced:
    """A partial or final transcript of one utterance of one track."""

    schema_name: ClassVar[str] = "callstream.events.TranscriptSegmentProduced"
    contact_id: str
    track: Track
    segment_id: str
    start_ms: int
    end_ms: int
    transcript: str
    is_partial: bool
    words: tuple[WordTiming, ...] = ()
    engine: str = ""
    language_code: str = ""
    call_start_time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that could not be processed, kept whole with the reason."""

    schema_name: ClassVar[str] = "callstream.events.DeadLetter"
    service: str
    source_stream: str
    shard_id: str
    sequence_number: str
    partition_key: str
    reason: str
    error_type: str
    failed_at_ms: int
    data: bytes


@dataclass(frozen=True, slots=True)
class RecordingStored:
    """A recording of a call is complete in S3 (published only for a whole, non-empty object)."""

    schema_name: ClassVar[str] = "callstream.events.RecordingStored"
    contact_id: str
    s3_uri: str
    bucket: str
    key: str
    format: str
    channel_tracks: tuple[Track, ...]
    channels: int
    sample_rate: int
    duration_ms: int
    byte_count: int
    checksum_algorithm: str
    checksum: str
    call_start_time_ms: int | None = None

    def __post_init__(self) -> None:
        # Avro hands arrays back as lists of symbols: keep the event hashable and typed.
        tracks = tuple(Track(t) for t in self.channel_tracks)
        object.__setattr__(self, "channel_tracks", tracks)


Event = (
    CallStarted
    | AudioChunkCaptured
    | CallEnded
    | TranscriptSegmentProduced
    | DeadLetter
    | RecordingStored
)
EVENT_TYPES: tuple[type[Any], ...] = (
    CallStarted,
    AudioChunkCaptured,
    CallEnded,
    TranscriptSegmentProduced,
    DeadLetter,
    RecordingStored,
)


def to_record(event: Event) -> dict[str, Any]:
    """The Avro-ready dict of an event (enums by value, tuples as lists)."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if isinstance(value, Enum):
            value = value.value
        elif f.name == "words":
            value = [dataclasses.asdict(w) for w in value]
        record[f.name] = value
    return record


def from_record(cls: type[Any], record: dict[str, Any]) -> Event:
    """Build an event of `cls` from a decoded Avro dict; unknown fields are ignored."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in record:
            continue
        value = record[f.name]
        if f.type == "Track":
            value = Track(value)
        elif f.type == "EndReason":
            value = EndReason(value)
        elif f.name == "words":
            value = tuple(WordTiming(**w) for w in value)
        kwargs[f.name] = value
    event: Event = cls(**kwargs)
    return event


def partition_key(event: Event) -> str:
    """Kinesis partition key: the contact, so a call stays in order on one shard."""
    if isinstance(event, DeadLetter):
        return event.partition_key or event.source_stream
    return event.contact_id
