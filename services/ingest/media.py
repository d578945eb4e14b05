"""The KVS edge of ingest: GetDataEndpoint, GetMedia, GetMediaForFragmentList.

Only boto3; where it goes (real KVS, LocalStack, the embedded emulator) is the
endpoint configuration. Media bytes are handed on as soon as they arrive
(`read1`), never waiting for a whole fragment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream.errors import MediaStreamError, RetryableError

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
_RETRYABLE = {
    "ClientLimitExceededException",
    "ConnectionLimitExceededException",
    "ThrottlingException",
}


class KvsMedia:
    """Reads one region's Kinesis Video streams."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.control = aws.client("kinesisvideo", region)

    def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Iterator[bytes]:
        """Yield the GetMedia body of a stream as it arrives, until the server ends it."""
        client = self._media_client(stream_arn, "GET_MEDIA", "kinesis-video-media")
        try:
            response = client.get_media(StreamARN=stream_arn, StartSelector=selector)
        except ClientError as e:
            raise _translate(e, stream_arn) from e
        except BotoCoreError as e:
            raise RetryableError(f"GetMedia on {stream_arn} failed: {e}") from e
        yield from _read_body(response["Payload"], stream_arn)

    def get_fragments(self, stream_arn: str, fragment_numbers: list[str]) -> Iterator[bytes]:
        """The given fragments in GetMedia shape, from the archive."""
        client = self._media_client(
            stream_arn, "GET_MEDIA_FOR_FRAGMENT_LIST", "kinesis-video-archived-media"
        )
        try:
            response = client.get_media_for_fragment_list(
                StreamARN=stream_arn, Fragments=fragment_numbers
            )
        except ClientError as e:
            raise _translate(e, stream_arn) from e
        except BotoCoreError as e:
            raise RetryableError(f"GetMediaForFragmentList on {stream_arn} failed: {e}") from e
        yield from _read_body(response["Payload"], stream_arn)

    def _media_client(self, stream_arn: str, api: str, service: str) -> Any:
        try:
            endpoint = self.control.get_data_endpoint(StreamARN=stream_arn, APIName=api)
        except ClientError as e:
            raise _translate(e, stream_arn) from e
        except BotoCoreError as e:
            raise RetryableError(f"GetDataEndpoint for {stream_arn} failed: {e}") from e
        # Media reads are long-lived streams: no read timeout, no retries of a half-read body.
        return aws.client(
            service,
            self.region,
            endpoint_url=endpoint["DataEndpoint"],
            read_timeout=120,
            retries={"mode": "standard", "max_attempts": 3},
        )


def _read_body(payload: Any, stream_arn: str) -> Iterator[bytes]:
    raw = getattr(payload, "_raw_stream", None)
    try:
        while True:
            data = raw.read1(READ_SIZE) if raw is not None else payload.read(READ_SIZE)
            if not data:
                return
            yield data
    except (BotoCoreError, OSError, ValueError) as e:
        raise RetryableError(f"GetMedia connection to {stream_arn} dropped: {e}") from e
    finally:
        payload.close()


def _translate(error: ClientError, stream_arn: str) -> Exception:
    code = error.response.get("Error", {}).get("Code", "")
    message = f"KVS {code} for {stream_arn}: {error.response.get('Error', {}).get('Message', '')}"
    if code in _RETRYABLE:
        return RetryableError(message)
    return MediaStreamError(message)
