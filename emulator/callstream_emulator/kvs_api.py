"""Request semantics of the emulated KVS data-plane APIs, free of HTTP.

What a GetMedia StartSelector means, which fragments ListFragments and
GetMediaForFragmentList return, and the API errors (real exception names and
HTTP status codes, so boto3 raises `ClientError`s with the right codes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from callstream_emulator.kvs_store import FragmentHead, FragmentStore, StoredFragment

DEFAULT_LIST_LIMIT = 1000


class ApiError(Exception):
    """An error answer: HTTP status, AWS error code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def invalid_argument(message: str) -> ApiError:
    """KVS's 400 InvalidArgumentException."""
    return ApiError(400, "InvalidArgumentException", message)


def not_found(message: str) -> ApiError:
    """KVS's 404 ResourceNotFoundException."""
    return ApiError(404, "ResourceNotFoundException", message)


@dataclass(frozen=True)
class StartPoint:
    """Where a GetMedia response starts.

    The first fragment numbered above `after` whose timestamp (producer or
    server, when `timestamp_kind` is set) is at least `min_ms`.
    """

    after: int
    timestamp_kind: str | None = None
    min_ms: int = 0

    def admits(self, fragment: StoredFragment | FragmentHead) -> bool:
        """Whether the response may start with this fragment."""
        if self.timestamp_kind == "PRODUCER_TIMESTAMP":
            return fragment.producer_ms >= self.min_ms
        if self.timestamp_kind == "SERVER_TIMESTAMP":
            return fragment.server_ms >= self.min_ms
        return True


def start_point(
    store: FragmentStore, stream_arn: str, selector: Any, *, inclusive: bool
) -> StartPoint:
    """Read a GetMedia StartSelector.

    FRAGMENT_NUMBER starts after AfterFragmentNumber (the API reference's
    wording), or with it when `inclusive`. CONTINUATION_TOKEN resumes after the
    fragment the token names. NOW: the next fragment to arrive. EARLIEST: the
    first stored. *_TIMESTAMP: the first fragment stamped at or after
    StartTimestamp (an emulator simplification of "the chunk containing it").
    """
    if not isinstance(selector, dict):
        raise invalid_argument("StartSelector is required")
    kind = selector.get("StartSelectorType")
    if kind == "NOW":
        return StartPoint(store.last_number(stream_arn))
    if kind == "EARLIEST":
        return StartPoint(0)
    if kind == "FRAGMENT_NUMBER":
        number = parse_fragment_number(selector.get("AfterFragmentNumber"), "AfterFragmentNumber")
        return StartPoint(number - 1 if inclusive else number)
    if kind == "CONTINUATION_TOKEN":
        token = selector.get("ContinuationToken")
        return StartPoint(parse_fragment_number(token, "ContinuationToken"))
    if kind in ("PRODUCER_TIMESTAMP", "SERVER_TIMESTAMP"):
        stamp = parse_timestamp_ms(selector.get("StartTimestamp"), "StartTimestamp")
        return StartPoint(0, kind, stamp)
    raise invalid_argument(f"unknown StartSelectorType {kind!r}")


def parse_fragment_number(value: Any, field: str) -> int:
    """A fragment number or continuation token (decimal digits) as an int."""
    if not isinstance(value, str) or not value.isdigit() or len(value) > 128:
        raise invalid_argument(f"{field} must be a fragment number, got {value!r}")
    return int(value)


def parse_timestamp_ms(value: Any, field: str) -> int:
    """A JSON timestamp (epoch seconds as boto3 sends it, or ISO 8601) in epoch ms."""
    if isinstance(value, bool) or value is None:
        raise invalid_argument(f"{field} is required")
    if isinstance(value, int | float):
        return round(float(value) * 1000)
    try:
        return round(float(value) * 1000)
    except (TypeError, ValueError):
        pass
    try:
        return round(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError as e:
        raise invalid_argument(f"{field} is not a timestamp: {value!r}") from e


def select_fragments(store: FragmentStore, stream_arn: str, numbers: Any) -> list[StoredFragment]:
    """GetMediaForFragmentList: the named fragments, in the order asked."""
    if not isinstance(numbers, list) or not numbers:
        raise invalid_argument("Fragments must be a non-empty list of fragment numbers")
    by_number = {fragment.number: fragment for fragment in store.fragments(stream_arn)}
    selected = []
    for value in numbers:
        fragment = by_number.get(parse_fragment_number(value, "Fragments"))
        if fragment is None:
            raise not_found(f"fragment {value} not found in the stream")
        selected.append(fragment)
    return selected


def list_fragments(store: FragmentStore, stream_arn: str, body: dict[str, Any]) -> dict[str, Any]:
    """ListFragments: fragment numbers and timestamps, optionally in a time range.

    FragmentLengthInMilliseconds is the producer-time gap to the next fragment
    (0 for the newest one): blocks are not decoded.
    """
    fragments = store.fragments(stream_arn)
    lengths = {
        a.number: max(0, b.producer_ms - a.producer_ms) for a, b in itertools.pairwise(fragments)
    }
    chosen = [f for f in fragments if _in_range(f, body.get("FragmentSelector"))]
    offset = int(body["NextToken"]) if str(body.get("NextToken") or "").isdigit() else 0
    limit = int(body.get("MaxResults") or DEFAULT_LIST_LIMIT)
    page = chosen[offset : offset + limit]
    result: dict[str, Any] = {"Fragments": [_listing(f, lengths.get(f.number, 0)) for f in page]}
    if offset + limit < len(chosen):
        result["NextToken"] = str(offset + limit)
    return result


def _in_range(fragment: StoredFragment, selector: Any) -> bool:
    if not selector:
        return True
    kind = selector.get("FragmentSelectorType")
    if kind not in ("PRODUCER_TIMESTAMP", "SERVER_TIMESTAMP"):
        raise invalid_argument(f"unknown FragmentSelectorType {kind!r}")
    window = selector.get("TimestampRange") or {}
    start = parse_timestamp_ms(window.get("StartTimestamp"), "StartTimestamp")
    end = parse_timestamp_ms(window.get("EndTimestamp"), "EndTimestamp")
    stamp = fragment.producer_ms if kind == "PRODUCER_TIMESTAMP" else fragment.server_ms
    return start <= stamp <= end


def _listing(fragment: StoredFragment, length_ms: int) -> dict[str, Any]:
    return {
        "FragmentNumber": fragment.number_str,
        "FragmentSizeInBytes": len(fragment.media.cluster),
        "ProducerTimestamp": fragment.producer_ms / 1000,
        "ServerTimestamp": fragment.server_ms / 1000,
        "FragmentLengthInMilliseconds": length_ms,
    }
