"""The KVS edge of ingest: GetDataEndpoint, GetMedia, GetMediaForFragmentList, S3 input files.

Only boto3; where it goes (real KVS, LocalStack, the embedded emulator) is the
endpoint configuration. Media bytes are handed on as soon as they arrive
(`read1`), never waiting for a whole fragment.

Data endpoints are cached per stream and API, and so are the media clients
per endpoint (a boto3 client costs milliseconds of CPU and about a megabyte;
hundreds of calls share a handful). An endpoint older than `endpoint_ttl_s`
is fetched again before the next connection (KVS endpoints are valid for
about 45 minutes), and at once when the server answers
`InvalidEndpointException`. Reads time out after `read_timeout_s` of
silence, so a stream whose producer went quiet never blocks a call forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import urllib3.exceptions
from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream.errors import MediaStreamError, RetryableError

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
ENDPOINT_TTL_S = 40 * 60
MAX_CLIENTS = 32  # media clients kept for reuse, newest first out last
_RETRYABLE = {
    "ClientLimitExceededException",
    "ConnectionLimitExceededException",
    "ThrottlingException",
}
_EXPIRED = "InvalidEndpointException"


class EndpointExpired(RetryableError):
    """The data endpoint is no longer valid; GetDataEndpoint must be called again."""


class ReadStalled(RetryableError):
    """No byte arrived for the read timeout; the connection was closed."""


class KvsMedia:
    """Reads one region's Kinesis Video streams (thread-safe; one per process)."""

    def __init__(
        self,
        region: str,
        *,
        read_timeout_s: float = 5.0,
        endpoint_ttl_s: float = ENDPOINT_TTL_S,
        max_connections: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.region = region
        self.read_timeout_s = read_timeout_s
        self.endpoint_ttl_s = endpoint_ttl_s
        self.max_connections = max_connections
        self.clock = clock
        self.control = aws.client("kinesisvideo", region)
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, str], tuple[str, float]] = {}
        self._clients: dict[tuple[str, str], Any] = {}

    def get_media(self, stream_arn: str, selector: dict[str, Any]) -> Generator[bytes, None, None]:
        """Yield the GetMedia body of a stream as it arrives, until the server ends it."""
        client = self._media_client(stream_arn, "GET_MEDIA", "kinesis-video-media")
        try:
            response = client.get_media(StreamARN=stream_arn, StartSelector=selector)
        except ClientError as e:
            raise self._translate(e, stream_arn, "GET_MEDIA") from e
        except BotoCoreError as e:
            raise RetryableError(f"GetMedia on {stream_arn} failed: {e}") from e
        yield from _read_body(response["Payload"], stream_arn)

    def get_fragments(
        self, stream_arn: str, fragment_numbers: list[str]
    ) -> Generator[bytes, None, None]:
        """The given fragments in GetMedia shape, from the archive."""
        api = "GET_MEDIA_FOR_FRAGMENT_LIST"
        client = self._media_client(stream_arn, api, "kinesis-video-archived-media")
        try:
            response = client.get_media_for_fragment_list(
                StreamARN=stream_arn, Fragments=fragment_numbers
            )
        except ClientError as e:
            raise self._translate(e, stream_arn, api) from e
        except BotoCoreError as e:
            raise RetryableError(f"GetMediaForFragmentList on {stream_arn} failed: {e}") from e
        yield from _read_body(response["Payload"], stream_arn)

    def endpoint_stale(self, stream_arn: str, api: str = "GET_MEDIA") -> bool:
        """Whether the cached endpoint is due for a refresh (a reader should reconnect)."""
        with self._lock:
            cached = self._endpoints.get((stream_arn, api))
        return cached is not None and self.clock() - cached[1] >= self.endpoint_ttl_s

    def release(self, stream_arn: str) -> None:
        """A call on this stream is over: drop its cached endpoints (bounded memory)."""
        with self._lock:
            for key in [k for k in self._endpoints if k[0] == stream_arn]:
                del self._endpoints[key]

    def forget_endpoint(self, stream_arn: str, api: str) -> None:
        """Drop a cached endpoint so the next connection fetches a fresh one."""
        with self._lock:
            self._endpoints.pop((stream_arn, api), None)

    def _endpoint(self, stream_arn: str, api: str) -> str:
        with self._lock:
            cached = self._endpoints.get((stream_arn, api))
        if cached is not None and self.clock() - cached[1] < self.endpoint_ttl_s:
            return cached[0]
        try:
            url = str(
                self.control.get_data_endpoint(StreamARN=stream_arn, APIName=api)["DataEndpoint"]
            )
        except ClientError as e:
            raise self._translate(e, stream_arn, api) from e
        except BotoCoreError as e:
            raise RetryableError(f"GetDataEndpoint for {stream_arn} failed: {e}") from e
        with self._lock:
            self._endpoints[(stream_arn, api)] = (url, self.clock())
        return url

    def _media_client(self, stream_arn: str, api: str, service: str) -> Any:
        endpoint = self._endpoint(stream_arn, api)
        with self._lock:
            client = self._clients.get((service, endpoint))
        if client is None:
            # Media bodies are long-lived: a short read timeout detects silence,
            # and a half-read body is never retried by botocore (the session resumes).
            client = aws.client(
                service,
                self.region,
                endpoint_url=endpoint,
                read_timeout=self.read_timeout_s,
                retries={"mode": "standard", "max_attempts": 3},
                max_pool_connections=self.max_connections,
            )
            with self._lock:
                client = self._clients.setdefault((service, endpoint), client)
                while len(self._clients) > MAX_CLIENTS:  # sessions keep their own reference
                    del self._clients[next(iter(self._clients))]
        return client

    def _translate(self, error: ClientError, stream_arn: str, api: str) -> Exception:
        code = error.response.get("Error", {}).get("Code", "")
        message = (
            f"KVS {code} for {stream_arn}: {error.response.get('Error', {}).get('Message', '')}"
        )
        if code == _EXPIRED:
            self.forget_endpoint(stream_arn, api)
            return EndpointExpired(message)
        if code in _RETRYABLE:
            return RetryableError(message)
        return MediaStreamError(message)


def _read_body(payload: Any, stream_arn: str) -> Generator[bytes, None, None]:
    raw = getattr(payload, "_raw_stream", None)
    try:
        while True:
            data = raw.read1(READ_SIZE) if raw is not None else payload.read(READ_SIZE)
            if not data:
                return
            yield data
    except (TimeoutError, urllib3.exceptions.ReadTimeoutError) as e:
        raise ReadStalled(f"GetMedia on {stream_arn}: nothing received ({e})") from e
    except (BotoCoreError, OSError, ValueError, urllib3.exceptions.HTTPError) as e:
        raise RetryableError(f"GetMedia connection to {stream_arn} dropped: {e}") from e
    finally:
        payload.close()


def iter_s3_object(region: str, uri: str, piece: int = READ_SIZE) -> Iterator[bytes]:
    """The body of `s3://bucket/key` in pieces, so an hours-long file stays out of memory."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise MediaStreamError(f"not an s3://bucket/key URI: {uri!r}")
    s3 = aws.client("s3", region)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404", "403", "AccessDenied"):
            raise MediaStreamError(f"cannot read {uri}: {code}") from e
        raise RetryableError(f"S3 GetObject {uri} failed: {code}") from e
    except BotoCoreError as e:
        raise RetryableError(f"S3 GetObject {uri} failed: {e}") from e
    try:
        yield from body.iter_chunks(piece)
    except (BotoCoreError, OSError, urllib3.exceptions.HTTPError) as e:
        raise RetryableError(f"reading {uri} failed: {e}") from e
    finally:
        body.close()
