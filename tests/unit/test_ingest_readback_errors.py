"""The read-back of a taken-over call (`PublishedEvents.since`) sorts AWS errors.

A missing or denied audio stream stops the service (no takeover can ever read
it); throttling, 5xx, a dropped connection and any other answer are no fault of
a record, so the run is tried again. Before, every error was retried, so a
deleted stream or a revoked permission looped forever.
"""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from callstream.errors import ConfigurationFault, PoisonRecordError, RetryableError
from services.ingest.published import PublishedEvents


def _client_error(code: str, status: int) -> ClientError:
    response: Any = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {}}
    response["ResponseMetadata"]["HTTPStatusCode"] = status
    return ClientError(response, "ListShards")


class _Failing:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def list_shards(self, **_: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("ResourceNotFoundException", 400), ConfigurationFault),
        (_client_error("AccessDeniedException", 400), ConfigurationFault),
        (_client_error("ProvisionedThroughputExceededException", 400), RetryableError),
        (_client_error("LimitExceededException", 400), RetryableError),
        (_client_error("InternalFailure", 500), RetryableError),
        (_client_error("InvalidArgumentException", 400), RetryableError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), RetryableError),
    ],
)
def test_a_failed_read_back_stops_only_on_a_configuration_fault(
    error: Exception, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as raised:
        PublishedEvents(_Failing(error), "audio").since("contact-1", 0)
    assert not isinstance(raised.value, PoisonRecordError)
    assert "audio" in str(raised.value) and "contact-1" in str(raised.value)
