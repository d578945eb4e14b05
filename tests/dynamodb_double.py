"""A test double of the boto3 DynamoDB resource: only the calls the row-writing handlers make.

Not an emulator: it implements exactly what the persister and the sentiment
handler call, with the answers DynamoDB gives them, and nothing else (any
other call is an AttributeError, any other condition NotImplementedError):

- `resource.Table(name).put_item(Item=..., [ConditionExpression=...,
  ExpressionAttributeValues=...])`; the conditions understood are clauses
  `attribute_not_exists(Name)` and `Name = :value` joined by `OR`;
- `resource.meta.client.batch_write_item(RequestItems=...)` (PutRequest only),
  answering `UnprocessedItems` beyond `capacity` items per request, as a
  throttled table does;
- `resource.meta.client.put_item(TableName=..., Item=...)`.

Values are the resource's Python types (the resource's client serialises
them): a float is refused with boto3's TypeError. DynamoDB's refusals are
ClientErrors with its codes: `ConditionalCheckFailedException`,
`ResourceNotFoundException` (no such table), `ValidationException` (over 25
requests or duplicate keys in one BatchWriteItem, a key attribute missing, an
item over 400 KB).

What survives an instance is the `Tables` (the rows); each instance gets its
own `DynamoDBDouble` over them. Every write request is an effect of kind
"put" through `Faults.effect` (tests/effect_faults.py). An injected raise
becomes what boto3 raises at that point: before the write, a throttling
ClientError (nothing written); after it, a `ReadTimeoutError` (written, the
answer lost). A `Crash` passes through.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace
from typing import Any, TypeVar

from botocore.exceptions import ClientError, ReadTimeoutError
from effect_faults import Faults

from callstream.errors import StoreUnavailable

T = TypeVar("T")
MAX_BATCH = 25
MAX_ITEM_BYTES = 400 * 1024
ENDPOINT = "https://dynamodb.us-east-1.amazonaws.com"
_NOT_EXISTS = re.compile(r"^attribute_not_exists\((\w+)\)$")
_EQUALS = re.compile(r"^(\w+) = (:\w+)$")


@dataclass
class Tables:
    """The durable part: each table's key schema and its rows by key."""

    keys: dict[str, tuple[str, str]]  # table -> (hash key, range key)
    rows: dict[str, dict[tuple[Any, Any], dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.keys:
            self.rows.setdefault(name, {})

    def contents(self) -> dict[str, dict[tuple[Any, Any], dict[str, Any]]]:
        """A deep copy of every table, for comparing runs."""
        return copy.deepcopy(self.rows)


def client_error(code: str, message: str, operation: str, status: int = 400) -> ClientError:
    """A ClientError as botocore raises it for a DynamoDB error answer."""
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


class DynamoDBDouble:
    """The resource: `Table(name)` and `meta.client`."""

    def __init__(self, tables: Tables, faults: Faults | None = None, capacity: int | None = None):
        self.tables = tables
        self.faults = faults or Faults()
        self.capacity = capacity
        self.meta = SimpleNamespace(client=_Client(self))
        self.requests: list[str] = []  # operation names, in order

    def Table(self, name: str) -> _Table:  # boto3 spells it so
        return _Table(self, name)

    # --- shared by the table and the client -------------------------------------------
    def effect(self, operation: str, apply: Callable[[], T]) -> T:
        """One write request; an injected raise becomes what boto3 raises there."""
        self.requests.append(operation)
        applied = False

        def run() -> T | ClientError:
            nonlocal applied
            try:
                result: T | ClientError = apply()
            except ClientError as refused:  # an answer (a failed condition): it can be lost too
                result = refused
            applied = True
            return result

        try:
            answer = self.faults.effect("put", run)
        except StoreUnavailable as e:
            if applied:
                raise ReadTimeoutError(endpoint_url=ENDPOINT) from e
            raise client_error("ProvisionedThroughputExceededException", str(e), operation) from e
        if isinstance(answer, ClientError):
            raise answer
        return answer

    def key_of(self, table: str, item: dict[str, Any], operation: str) -> tuple[Any, Any]:
        if table not in self.tables.keys:
            raise client_error(
                "ResourceNotFoundException", "Requested resource not found", operation
            )
        hash_key, range_key = self.tables.keys[table]
        if hash_key not in item or range_key not in item:
            raise client_error(
                "ValidationException",
                "One of the required keys was not given a value",
                operation,
            )
        return item[hash_key], item[range_key]

    def check_item(self, item: dict[str, Any], operation: str) -> None:
        for name, value in item.items():
            _check_value(value)
            if not isinstance(name, str):
                raise TypeError(f"attribute names are strings, got {name!r}")
        if _size(item) > MAX_ITEM_BYTES:
            raise client_error(
                "ValidationException",
                "Item size has exceeded the maximum allowed size",
                operation,
            )


class _Table:
    def __init__(self, db: DynamoDBDouble, name: str) -> None:
        self.db = db
        self.name = name

    def put_item(
        self,
        *,
        Item: dict[str, Any],
        ConditionExpression: str | None = None,
        ExpressionAttributeValues: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        operation = "PutItem"
        key = self.db.key_of(self.name, Item, operation)
        self.db.check_item(Item, operation)

        def write() -> dict[str, Any]:
            rows = self.db.tables.rows[self.name]
            if ConditionExpression is not None and not _holds(
                ConditionExpression, ExpressionAttributeValues or {}, rows.get(key)
            ):
                raise client_error(
                    "ConditionalCheckFailedException", "The conditional request failed", operation
                )
            rows[key] = copy.deepcopy(Item)
            return {}

        return self.db.effect(operation, write)


class _Client:
    def __init__(self, db: DynamoDBDouble) -> None:
        self.db = db

    def put_item(self, *, TableName: str, Item: dict[str, Any]) -> dict[str, Any]:
        return self.db.Table(TableName).put_item(Item=Item)

    def batch_write_item(
        self,
        *,
        RequestItems: dict[str, list[dict[str, Any]]],
    ) -> dict[str, Any]:
        operation = "BatchWriteItem"
        puts: list[tuple[str, tuple[Any, Any], dict[str, Any]]] = []
        for table, requests in RequestItems.items():
            for request in requests:
                if set(request) != {"PutRequest"}:
                    raise NotImplementedError(f"only PutRequest is doubled, got {set(request)}")
                item = request["PutRequest"]["Item"]
                puts.append((table, self.db.key_of(table, item, operation), item))
                self.db.check_item(item, operation)
        if not 0 < len(puts) <= MAX_BATCH:
            raise client_error(
                "ValidationException",
                f"Member must have length less than or equal to {MAX_BATCH}",
                operation,
            )
        if len({(table, key) for table, key, _ in puts}) != len(puts):
            raise client_error(
                "ValidationException", "Provided list of item keys contains duplicates", operation
            )

        def write() -> dict[str, Any]:
            taken = puts if self.db.capacity is None else puts[: self.db.capacity]
            for table, key, item in taken:
                self.db.tables.rows[table][key] = copy.deepcopy(item)
            unprocessed: dict[str, list[dict[str, Any]]] = {}
            for table, _, item in puts[len(taken) :]:
                unprocessed.setdefault(table, []).append({"PutRequest": {"Item": item}})
            return {"UnprocessedItems": unprocessed}

        return self.db.effect(operation, write)


def _holds(expression: str, values: dict[str, Any], stored: dict[str, Any] | None) -> bool:
    """The condition on the stored item (None: no item), for the clauses understood."""
    results = []
    for clause in expression.split(" OR "):
        clause = clause.strip()
        if (match := _NOT_EXISTS.match(clause)) is not None:
            results.append(stored is None or match[1] not in stored)
        elif (match := _EQUALS.match(clause)) is not None:
            name, placeholder = match[1], match[2]
            if placeholder not in values:
                raise client_error(
                    "ValidationException",
                    f"An expression attribute value used in expression is not defined: "
                    f"{placeholder}",
                    "PutItem",
                )
            results.append(
                stored is not None and name in stored and stored[name] == values[placeholder]
            )
        else:
            raise NotImplementedError(f"condition clause not doubled: {clause!r}")
    return any(results)


def _check_value(value: Any) -> None:
    """boto3's serializer refuses floats (Decimal only) and types DynamoDB lacks."""
    if isinstance(value, float):
        raise TypeError("Float types are not supported. Use Decimal types instead.")
    if isinstance(value, dict):
        for inner in value.values():
            _check_value(inner)
    elif isinstance(value, (list, tuple, set)):
        for inner in value:
            _check_value(inner)
    elif not isinstance(value, (str, bytes, bool, int, Decimal, type(None))):
        raise TypeError(f"Unsupported type {type(value)} for value {value!r}")


def _size(item: dict[str, Any]) -> int:
    """About what DynamoDB counts: names and values as UTF-8."""
    return sum(len(name.encode()) + len(str(value).encode()) for name, value in item.items())
