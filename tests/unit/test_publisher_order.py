"""The producer keeps each partition key's order through partial PutRecords failures.

A scripted client plays one shard: it stores the entries it accepts, in
request order, and refuses others entry by entry as Kinesis does (and goes
on with the entries after a refused one).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError

from callstream.bus import kinesis
from callstream.bus.kinesis import KinesisPublisher
from callstream.errors import ConfigurationFault, PoisonRecordError, StoreUnavailable, stored_of

THROTTLED = "ProvisionedThroughputExceededException"
Refuse = Callable[[str, bytes], str | None]  # (key, data) -> an error code, or None to store


class _Shard:
    """PutRecords against one shard: `refuse` decides per entry."""

    def __init__(self, refuse: Refuse | None = None, delay_s: float = 0.0) -> None:
        self.refuse = refuse or (lambda key, data: None)
        self.delay_s = delay_s
        self.stored: list[tuple[str, bytes]] = []
        self.requests: list[list[str]] = []
        self.lock = threading.Lock()
        self.error: ClientError | None = None

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        time.sleep(self.delay_s)
        with self.lock:
            self.requests.append([r["PartitionKey"] for r in Records])
            if self.error is not None:
                raise self.error
            results: list[dict[str, Any]] = []
            for record in Records:
                code = self.refuse(record["PartitionKey"], record["Data"])
                if code:
                    results.append({"ErrorCode": code, "ErrorMessage": code})
                else:
                    self.stored.append((record["PartitionKey"], record["Data"]))
                    results.append({"SequenceNumber": str(len(self.stored)), "ShardId": "s"})
            failed = sum(1 for r in results if "ErrorCode" in r)
            return {"FailedRecordCount": failed, "Records": results}

    def of(self, key: str) -> list[bytes]:
        return [data for k, data in self.stored if k == key]

    def stored_sorted(self) -> list[tuple[str, bytes]]:
        return sorted(self.stored)


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kinesis, "BACKOFF_BASE_S", 0.002)
    monkeypatch.setattr(kinesis, "BACKOFF_CAP_S", 0.05)


def _items(key: str, n: int) -> list[tuple[str, bytes]]:
    return [(key, f"{key}-{i:04d}".encode()) for i in range(n)]


def _error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutRecords")


def test_refused_entries_never_let_a_later_record_of_their_key_in_first() -> None:
    rng = random.Random(7)
    shard = _Shard(lambda key, data: THROTTLED if rng.random() < 0.3 else None)
    publisher = KinesisPublisher(shard, "audio")
    items = [item for i in range(60) for item in (("a", b"a%03d" % i), ("b", b"b%03d" % i))]
    publisher.put_raw(items)
    for key in ("a", "b"):
        assert shard.of(key) == [data for k, data in items if k == key]  # in order, once each
    assert all(max(Counter(keys).values()) == 1 for keys in shard.requests)


def test_one_publish_goes_out_in_its_own_order_a_run_of_distinct_keys_per_request() -> None:
    shard = _Shard()
    publisher = KinesisPublisher(shard, "audio")
    items = [("a", b"a0"), ("b", b"b0"), ("a", b"a1"), ("b", b"b1"), ("c", b"c0"), ("c", b"c1")]
    publisher.put_raw(items)
    assert shard.stored == items  # as one PutRecords of it would store them
    assert shard.requests == [["a", "b"], ["a", "b", "c"], ["c"]]
    assert publisher.requests == 3


def test_concurrent_publishers_ride_in_the_same_requests() -> None:
    shard = _Shard(delay_s=0.005)  # a round trip, during which the other callers queue up
    publisher = KinesisPublisher(shard, "audio")
    start = threading.Barrier(40)

    def call(n: int) -> None:
        start.wait()
        publisher.put_raw(_items(f"call-{n}", 2))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(shard.stored) == 80
    assert len(shard.requests) <= 20  # 80 records, 2 per key: alone they would take 80
    for n in range(40):
        assert shard.of(f"call-{n}") == [data for _, data in _items(f"call-{n}", 2)]


def test_a_throttled_key_backs_off_while_other_keys_go_on() -> None:
    refusals = {"hot": 12}  # backing off for ~0.3 s in all

    def refuse(key: str, data: bytes) -> str | None:
        if refusals.get(key, 0) > 0:
            refusals[key] -= 1
            return THROTTLED
        return None

    shard = _Shard(refuse)
    publisher = KinesisPublisher(shard, "audio")
    hot = threading.Thread(target=publisher.put_raw, args=(_items("hot", 2),))
    hot.start()
    time.sleep(0.01)  # "hot" is backing off by now
    started = time.monotonic()
    publisher.put_raw(_items("cold", 3))
    cold_s = time.monotonic() - started
    cold_done = len(shard.requests)
    hot.join(5)
    assert shard.of("hot") == [b"hot-0000", b"hot-0001"]
    assert shard.of("cold") == [b"cold-0000", b"cold-0001", b"cold-0002"]
    assert any("hot" in keys for keys in shard.requests[cold_done:])  # "hot" finished later
    assert cold_s < 0.1


def test_a_publish_past_its_deadline_fails_and_so_does_the_next_on_its_key() -> None:
    shard = _Shard(lambda key, data: THROTTLED if key == "stuck" else None)
    publisher = KinesisPublisher(shard, "audio", deadline_s=0.3)
    errors: list[BaseException] = []

    def later() -> None:
        time.sleep(0.05)
        try:
            publisher.put_raw(_items("stuck", 1) + _items("free", 1))
        except StoreUnavailable as e:
            errors.append(e)

    behind = threading.Thread(target=later)
    behind.start()
    with pytest.raises(StoreUnavailable, match="not accepted by stream audio within 0 s"):
        publisher.put_raw(_items("stuck", 2))
    behind.join(5)
    assert len(errors) == 1 and "an earlier record of partition key stuck" in str(errors[0])
    assert shard.of("stuck") == []
    publisher.put_raw(_items("other", 2))  # the publisher carries on
    assert shard.of("other") == [b"other-0000", b"other-0001"]


def test_a_kms_entry_error_is_a_configuration_fault() -> None:
    shard = _Shard(lambda key, data: "KMSAccessDeniedException" if data.endswith(b"1") else None)
    with pytest.raises(ConfigurationFault, match="KMSAccessDeniedException"):
        KinesisPublisher(shard, "audio").put_raw(_items("a", 3))
    assert shard.of("a") == [b"a-0000"]  # nothing after the refused record


@pytest.mark.parametrize(
    ("code", "raised"),
    [
        ("AccessDeniedException", ConfigurationFault),
        ("InvalidArgumentException", PoisonRecordError),
    ],
)
def test_request_errors_no_retry_mends_are_raised_at_once(
    code: str, raised: type[Exception]
) -> None:
    shard = _Shard()
    shard.error = _error(code)
    with pytest.raises(raised):
        KinesisPublisher(shard, "audio").put_raw(_items("a", 2))
    assert len(shard.requests) == 1


def test_a_throttled_request_is_retried_whole() -> None:
    shard = _Shard()
    shard.error = _error(THROTTLED)

    def heal() -> None:
        time.sleep(0.2)
        shard.error = None

    threading.Thread(target=heal).start()
    KinesisPublisher(shard, "audio").put_raw(_items("a", 3))
    assert shard.of("a") == [data for _, data in _items("a", 3)]
    assert len(shard.requests) > 3


def test_a_zero_deadline_gives_up_at_the_first_refusal_only() -> None:
    shard = _Shard()
    publisher = KinesisPublisher(shard, "audio", deadline_s=0)
    publisher.put_raw(_items("a", 5))  # five rounds, none refused: stored
    assert shard.of("a") == [data for _, data in _items("a", 5)]
    refusals = iter([None, THROTTLED])
    shard.refuse = lambda key, data: next(refusals, None)
    with pytest.raises(StoreUnavailable, match="1 records not accepted"):
        publisher.put_raw(_items("b", 2))
    assert shard.of("b") == [b"b-0000"]


def test_a_failed_publish_says_which_of_its_records_were_stored() -> None:
    # Keys a and b share requests; b's third record is refused at a deadline of 0.
    shard = _Shard(lambda key, data: THROTTLED if data == b"b-0002" else None)
    publisher = KinesisPublisher(shard, "audio", deadline_s=0)
    items = [*_items("a", 4), *_items("b", 4)]
    with pytest.raises(StoreUnavailable) as raised:
        publisher.put_raw(items)
    stored = stored_of(raised.value, len(items))
    assert [item for item, s in zip(items, stored, strict=True) if s] == shard.stored_sorted()
    assert stored == (True,) * 4 + (True, True, False, False)
    # Sending the others again completes the publish with no record twice.
    shard.refuse = lambda key, data: None
    publisher.put_raw([item for item, s in zip(items, stored, strict=True) if not s])
    assert sorted(shard.stored) == sorted(items)


def test_a_failed_publish_with_nothing_stored_says_nothing() -> None:
    shard = _Shard(lambda key, data: THROTTLED)
    with pytest.raises(StoreUnavailable) as raised:
        KinesisPublisher(shard, "audio", deadline_s=0).put_raw(_items("a", 2))
    assert raised.value.stored is None
    assert stored_of(raised.value, 2) == (False, False)
