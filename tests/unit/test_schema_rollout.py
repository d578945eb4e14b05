"""Schema rollouts: a consumer without the writer's schema pauses the shard, never dead-letters.

"Old consumer": a Contract over a copy of `schemas/` without the newest
AudioChunkCaptured (v2). "New producer": the full set. See docs/schema-rollouts.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterable, Iterator

import pytest

from callstream import contract as contract_module
from callstream.bus.memory import MemoryPublisher, MemorySource, MemoryStream
from callstream.bus.ports import Record
from callstream.config import WRITER_SCHEMAS, BusSettings, Env
from callstream.contract import SCHEMAS_DIR, Contract, default_contract
from callstream.errors import ConfigError, RetryableError, UnknownWriterSchema
from callstream.events import AudioChunkCaptured, CallEnded, CallStarted, EndReason, Event, Track
from callstream.metrics import DEAD_LETTERS, ERRORS, SHARDS_PAUSED, Metrics
from callstream.runtime import ServiceLoop, ShardPauses
from callstream.service import load_settings
from services.recorder.settings import RecorderSettings

NEW = Contract()
SHARDS = 2


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> Contract:
    """A consumer built before AudioChunkCaptured v2 existed."""
    target = tmp_path_factory.mktemp("old-schemas")
    for path in SCHEMAS_DIR.glob("*.avsc"):
        if path.name != "AudioChunkCaptured.v2.avsc":
            shutil.copy(path, target / path.name)
    return Contract(target)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Seen:
    """Test handler: records every event; a call is settled once its CallEnded was handled."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []  # (shard, sequence) of every handled record
        self.events: list[Event] = []
        self.ended: set[str] = set()

    def handle(self, event: Event, record: Record) -> None:
        self.seen.append((record.shard_id, record.sequence_number))
        self.events.append(event)
        if isinstance(event, CallEnded):
            self.ended.add(event.contact_id)

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.ended

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        return None


def _contact_on(shard: int, prefix: str) -> str:
    """A contact id MemoryStream routes to `shard` (MD5 of the key, like Kinesis)."""
    for n in range(1000):
        contact = f"{prefix}-{n}"
        if int(hashlib.md5(contact.encode()).hexdigest(), 16) % SHARDS == shard:
            return contact
    raise AssertionError("no contact found")


def _call(contact: str, chunks: int = 2) -> list[Event]:
    audio: list[Event] = [
        AudioChunkCaptured(
            contact_id=contact,
            track=Track.FROM_CUSTOMER,
            sequence=i,
            sample_offset=i * 1024,
            offset_ms=i * 128,
            start_time_ms=0,
            pcm=b"\x01\x00" * 1024,
            fragment_number="91",
            gap_before_ms=40,
            gap_total_ms=40 * (i + 1),
        )
        for i in range(chunks)
    ]
    return [CallStarted(contact, "arn", 0), *audio, CallEnded(contact, EndReason.END_OF_STREAM, 0)]


def _records(stream: MemoryStream) -> list[tuple[str, str]]:
    return [(r.shard_id, r.sequence_number) for shard in stream.shards for r in shard]


class Rig:
    """An old consumer's loop over a two-shard stream, with a fake clock for its pauses."""

    def __init__(self, consumer: Contract, restarted: Rig | None = None) -> None:
        """A fresh stream, or (`restarted`) a new instance over another rig's stream."""
        self.stream: MemoryStream = (
            restarted.stream if restarted else MemoryStream("audio", shard_count=SHARDS)
        )
        self.dead: MemoryStream = restarted.dead if restarted else MemoryStream("dead")
        self.checkpoints: dict = restarted.checkpoints if restarted else {}
        self.handler = Seen()
        self.clock = Clock()
        self.metrics = Metrics("test", "prometheus")
        self.loop = self.consumer(consumer)

    def consumer(self, contract: Contract) -> ServiceLoop:
        loop = ServiceLoop(
            "test",
            MemorySource(self.stream, self.checkpoints),
            self.handler,
            MemoryPublisher(self.dead, NEW),
            contract=contract,
            metrics=self.metrics,
        )
        loop.pauses = ShardPauses(base_s=1.0, cap_s=30.0, clock=self.clock)
        return loop

    def round(self) -> None:
        self.loop.process(self.loop.source.poll())
        self.loop.checkpoint()


def test_unknown_writer_schema_pauses_its_shard_dead_letters_nothing_and_other_shards_go_on(
    old: Contract,
) -> None:
    rig = Rig(old)
    paused, other = _contact_on(0, "paused"), _contact_on(1, "other")
    done_first = _contact_on(0, "done")
    producer = MemoryPublisher(rig.stream, NEW)
    producer.publish([CallStarted(done_first, "arn", 0), CallEnded(done_first, EndReason.ERROR, 0)])
    producer.publish(_call(paused) + _call(other, chunks=0))  # shard 1: records it can read
    rig.round()
    producer.publish(_call(_contact_on(0, "later")) + _call(_contact_on(1, "later"), chunks=0))
    rig.round()

    assert rig.dead.shards[0] == []
    shard0, shard1 = "shardId-000000000000", "shardId-000000000001"
    handled = [seq for shard, seq in rig.handler.seen if shard == shard0]
    assert handled == ["1", "2", "3"]  # the call before, and the paused call's CallStarted
    assert [s for s, _ in rig.handler.seen].count(shard1) == len(rig.stream.shards[1])
    assert rig.checkpoints[shard0] == ("3", True)  # at the open call, never past record 4
    assert rig.checkpoints[shard1] == (str(len(rig.stream.shards[1])), False)
    assert rig.metrics.value(SHARDS_PAUSED) == 1
    assert rig.metrics.value(DEAD_LETTERS) is None
    assert rig.metrics.value(ERRORS, type="UnknownWriterSchema") == 1


def test_an_upgraded_consumer_processes_every_record_of_the_paused_shard_exactly_once(
    old: Contract,
) -> None:
    rig = Rig(old)
    producer = MemoryPublisher(rig.stream, NEW)
    calls = [_contact_on(shard, f"c{n}") for n in range(3) for shard in range(SHARDS)]
    producer.publish(_call(calls[0]) + _call(calls[1]))
    rig.round()
    producer.publish([e for c in calls[2:] for e in _call(c)])
    for _ in range(3):  # still old: each retry pauses again, with backoff
        rig.clock.now += 60
        rig.round()
    assert rig.metrics.value(SHARDS_PAUSED) == SHARDS
    assert rig.dead.shards[0] == []

    rig.loop.contract = NEW  # the consumer is upgraded (hot, here: a restart is tested below)
    rig.clock.now += 60
    rig.round()  # the retry rewinds the shard to its stuck record
    rig.round()  # ... which the next poll returns

    assert sorted(rig.handler.seen) == sorted(_records(rig.stream))  # each exactly once
    assert rig.dead.shards[0] == []
    assert rig.metrics.value(SHARDS_PAUSED) == 0
    for index, shard in enumerate(rig.stream.shards):
        assert rig.checkpoints[f"shardId-{index:012d}"] == (str(len(shard)), False)


def test_a_restarted_upgraded_consumer_resumes_at_the_stuck_record_and_loses_nothing(
    old: Contract,
) -> None:
    rig = Rig(old)
    producer = MemoryPublisher(rig.stream, NEW)
    first = _contact_on(0, "settled")
    producer.publish([CallStarted(first, "arn", 0), CallEnded(first, EndReason.ERROR, 0)])
    producer.publish([e for n in range(4) for e in _call(_contact_on(n % SHARDS, f"r{n}"))])
    rig.round()  # then the old instance is replaced (killed: no clean stop needed)
    before = list(rig.handler.seen)
    assert rig.metrics.value(SHARDS_PAUSED) == SHARDS

    resume = dict(rig.checkpoints)
    upgraded = Rig(NEW, restarted=rig)
    upgraded.round()

    # The new instance reads each shard from its checkpoint, at or before the stuck record
    # (the paused calls' first records, handled again by design), to the end: nothing lost.
    for index, shard in enumerate(rig.stream.shards):
        shard_id = f"shardId-{index:012d}"
        position, inclusive = resume[shard_id]
        start = int(position) if inclusive else int(position) + 1
        again = [seq for s, seq in upgraded.handler.seen if s == shard_id]
        assert again == [str(n) for n in range(start, len(shard) + 1)]
    assert set(before + upgraded.handler.seen) == set(_records(rig.stream))
    assert rig.dead.shards[0] == []
    assert upgraded.checkpoints == {
        f"shardId-{i:012d}": (str(len(shard)), False) for i, shard in enumerate(rig.stream.shards)
    }


def test_a_record_after_the_stuck_one_is_never_handled_before_it(old: Contract) -> None:
    class NoRewind(MemorySource):
        def rewind(self, shard_id: str, sequence_number: str) -> None:
            return None  # a rewind that did not take: the source reads on past the record

    rig = Rig(old)
    rig.loop.source = NoRewind(rig.stream, rig.checkpoints)
    producer = MemoryPublisher(rig.stream, NEW)
    contact = _contact_on(0, "solo")
    producer.publish(_call(contact))
    rig.round()
    rig.loop.contract = NEW
    rig.clock.now += 60
    rig.round()
    producer.publish(_call(contact))
    rig.round()
    assert rig.handler.seen == [("shardId-000000000000", "1")]
    assert rig.checkpoints["shardId-000000000000"] == ("1", True)
    assert rig.metrics.value(SHARDS_PAUSED) == 1


def test_a_paused_shard_is_retried_with_backoff_and_forgotten_when_lost() -> None:
    clock = Clock()
    pauses = ShardPauses(base_s=1.0, cap_s=5.0, clock=clock)
    delays = []
    for _ in range(5):
        delays.append(pauses.pause("s", "7"))
        assert pauses.holds_back("s", "8") and pauses.due() == []
        clock.now += delays[-1]
        assert pauses.due() == [("s", "7")]
        pauses.resumed("s")
        assert not pauses.holds_back("s", "7")
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    pauses.drop("s")
    assert len(pauses) == 0 and not pauses.holds_back("s", "8")


def test_the_pause_is_logged_with_shard_and_fingerprint(
    old: Contract, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(old)
    MemoryPublisher(rig.stream, NEW).publish(_call(_contact_on(1, "logged")))
    with caplog.at_level(logging.ERROR, logger="callstream.runtime"):
        rig.round()
    (line,) = [r for r in caplog.records if "paused" in r.getMessage()]
    fingerprint = NEW.writer_schema(AudioChunkCaptured.schema_name).fingerprint.hex()
    assert line.shard_id == "shardId-000000000001"  # type: ignore[attr-defined]
    assert line.fingerprint == fingerprint  # type: ignore[attr-defined]
    assert "upgrade this consumer or pin producers" in line.getMessage()


def test_unknown_writer_schema_is_retryable_and_names_the_fingerprint(old: Contract) -> None:
    data = NEW.encode(_call("c")[1])
    with pytest.raises(UnknownWriterSchema) as raised:
        old.decode(data)
    assert isinstance(raised.value, RetryableError)
    assert raised.value.fingerprint == data[2:10].hex()
    assert "upgrade this consumer or pin producers" in str(raised.value)


# --- pinned producers ------------------------------------------------------------


def test_a_pinned_new_producer_writes_records_an_old_consumer_decodes(old: Contract) -> None:
    pinned = Contract(pins={"AudioChunkCaptured": 1})
    rig = Rig(old)
    events = [e for n in range(4) for e in _call(_contact_on(n % SHARDS, f"p{n}"))]
    MemoryPublisher(rig.stream, pinned).publish(events)
    rig.round()
    assert sorted(rig.handler.seen) == sorted(_records(rig.stream))
    assert rig.dead.shards[0] == [] and rig.metrics.value(SHARDS_PAUSED) == 0
    chunk = next(e for e in rig.handler.events if isinstance(e, AudioChunkCaptured))
    assert chunk.pcm == b"\x01\x00" * 1024 and chunk.gap_total_ms == 0  # v1 has no gaps


def test_a_pin_writes_the_old_version_and_drops_fields_it_lacks() -> None:
    pinned = Contract(pins={"callstream.events.AudioChunkCaptured": 1, "CallEnded": 1})
    chunk = _call("c")[1]
    data = pinned.encode(chunk)
    assert data[2:10] == pinned.writer_schema(chunk.schema_name).fingerprint
    assert pinned.writer_schema(chunk.schema_name).version == 1
    assert pinned.writer_schema(CallStarted.schema_name) == NEW.writer_schema(
        CallStarted.schema_name
    )
    decoded = NEW.decode(data)
    assert isinstance(decoded, AudioChunkCaptured)
    assert isinstance(chunk, AudioChunkCaptured) and chunk.gap_before_ms == 40
    assert decoded.gap_before_ms == 0 and decoded.pcm == chunk.pcm


def test_an_old_producer_writes_records_a_new_consumer_decodes(old: Contract) -> None:
    rig = Rig(NEW)
    MemoryPublisher(rig.stream, old).publish(_call(_contact_on(0, "o")))
    rig.round()
    assert sorted(rig.handler.seen) == sorted(_records(rig.stream))
    assert rig.dead.shards[0] == []


@pytest.fixture
def fresh_default_contract() -> Iterator[None]:
    default_contract.cache_clear()
    yield
    default_contract.cache_clear()


def test_the_process_wide_contract_writes_the_pins_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, fresh_default_contract: None
) -> None:
    monkeypatch.setenv(WRITER_SCHEMAS, "AudioChunkCaptured=1")
    assert (
        contract_module.default_contract().writer_schema(AudioChunkCaptured.schema_name).version
        == 1
    )
    assert default_contract().writer_schema(CallEnded.schema_name).version == 2


@pytest.mark.parametrize(
    "value,expected",
    [
        ("AudioChunkCaptured=3", "no schema file AudioChunkCaptured.v3.avsc"),
        ("AudioChunkCaptures=1", "no record of that name"),
        ("AudioChunkCaptured", "Record=version"),
        ("AudioChunkCaptured=1,AudioChunkCaptured=2", "twice"),
    ],
)
def test_a_bad_pin_is_a_config_error_naming_the_variable(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as raised:
        BusSettings.from_env(Env({WRITER_SCHEMAS: value}))
    assert WRITER_SCHEMAS in str(raised.value)


def test_a_service_with_a_bad_pin_stops_at_start_up(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"RECORDINGS_BUCKET_NAME": "recordings", WRITER_SCHEMAS: "CallEnded=9"}
    with pytest.raises(SystemExit) as exited:
        load_settings(lambda: RecorderSettings.from_env(environ))
    assert exited.value.code == 2
    assert f"{WRITER_SCHEMAS}: pin CallEnded=9" in capsys.readouterr().err


def test_the_process_wide_contract_refuses_a_bad_pin(
    monkeypatch: pytest.MonkeyPatch, fresh_default_contract: None
) -> None:
    monkeypatch.setenv(WRITER_SCHEMAS, "CallEnded=9")
    with pytest.raises(ConfigError, match=WRITER_SCHEMAS):
        default_contract()


def test_settings_carry_the_pins() -> None:
    settings = BusSettings.from_env(Env({WRITER_SCHEMAS: "CallEnded=1, AudioChunkCaptured=v1"}))
    assert settings.writer_pins == (("AudioChunkCaptured", 1), ("CallEnded", 1))
    assert BusSettings.from_env(Env({})).writer_pins == ()
