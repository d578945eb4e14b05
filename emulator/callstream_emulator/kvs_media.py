"""The emulated KVS media (data-plane) endpoint, on its own 127.0.0.1 port.

Speaks the wire protocol boto3 (`kinesis-video-media`,
`kinesis-video-archived-media`) and the KVS producer SDKs use:

- `POST /putMedia`: streaming MKV body (chunked), streaming JSON ACKs back.
- `POST /getMedia`: JSON StartSelector in, `video/webm` chunked stream out;
  a fragment is sent as PutMedia stores it (its header when its Cluster
  starts, then its blocks and tags as they come, its position tags once it
  is complete), never held back until the next one starts; a fragment the
  producer breaks off inside cuts the connection (the reader resumes from
  its last continuation token). Stays open while a producer is connected to
  the stream; once every fragment was sent it ends `get_media_idle_timeout`
  seconds after the last producer left (after the request, on a stream never
  produced to).
- `POST /getMediaForFragmentList`, `POST /listFragments`: archived media.
- `GET|POST /_emulator/faults`: fault control for other processes (see faults.py);
  the snapshot also carries the Kinesis quota counters.
- `GET /_emulator/metrics`: the Kinesis throttle and usage counters in the
  Prometheus text format.

Every media path may carry an endpoint generation prefix, `/gen/<n>/getMedia`,
as the URLs GetDataEndpoint hands out do; older generations are refused once
`Faults.expire_data_endpoints()` ran. Signatures are not verified.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from callstream_emulator.faults import EXPIRED_ENDPOINT_ERROR, EXPIRED_ENDPOINT_STATUS, Faults
from callstream_emulator.kvs_api import (
    ApiError,
    invalid_argument,
    list_fragments,
    select_fragments,
    start_point,
)
from callstream_emulator.kvs_output import render_fragment, render_head, render_tail
from callstream_emulator.kvs_put_media import TIMECODE_TYPES, PutMediaSession
from callstream_emulator.kvs_store import COMPLETE, OPEN, FragmentStore, LiveFragment

logger = logging.getLogger(__name__)

# (stream name or None, stream ARN or None, region) -> (name, ARN); raises ApiError.
StreamResolver = Callable[[str | None, str | None, str], tuple[str, str]]

_GENERATION = re.compile(r"^/gen/(\d+)(/.*)$")
_REGION = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/")
_READ_SIZE = 64 * 1024


@dataclass
class MediaOptions:
    """Behaviour switches of the media endpoint; may be changed while it runs."""

    region: str = "us-east-1"
    # GetMedia FRAGMENT_NUMBER: start WITH AfterFragmentNumber instead of after it.
    fragment_selector_inclusive: bool = False
    # Seconds after the last producer left (or the request, if none ever came)
    # at which a caught-up GetMedia ends.
    get_media_idle_timeout: float = 1.0


@dataclass(frozen=True)
class _Context:
    store: FragmentStore
    faults: Faults
    resolve: StreamResolver
    options: MediaOptions


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    context: _Context


def now_ms() -> int:
    """Wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


class KvsMediaServer:
    """The media endpoint: a threading HTTP server bound to a loopback port."""

    def __init__(
        self,
        store: FragmentStore,
        faults: Faults,
        resolve: StreamResolver,
        options: MediaOptions,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._server = _Server((host, port), _MediaHandler)
        self._server.context = _Context(store, faults, resolve, options)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43121 (no generation prefix)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """End waiting GetMedia responses, stop accepting, release the port."""
        self._server.context.store.close()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _MediaHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def ctx(self) -> _Context:
        return self.server.context

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        if route == "/_emulator/faults":
            self._send_json(200, self.ctx.faults.snapshot())
        elif route == "/_emulator/metrics":
            self._send_text(200, self.ctx.faults.metrics_text())
        else:
            self._send_error(ApiError(404, "UnknownOperationException", self.path), close=False)

    def do_POST(self) -> None:
        generation, route = _split_path(self.path.split("?")[0])
        routes: dict[str, Callable[[], None]] = {
            "/putMedia": self._put_media,
            "/getMedia": self._get_media,
            "/getMediaForFragmentList": self._get_media_for_fragment_list,
            "/listFragments": self._list_fragments,
            "/_emulator/faults": self._control_faults,
        }
        try:
            action = routes.get(route)
            if action is None:
                raise ApiError(404, "UnknownOperationException", f"no operation at {route}")
            if not route.startswith("/_emulator/") and self.ctx.faults.endpoint_expired(generation):
                raise ApiError(
                    EXPIRED_ENDPOINT_STATUS,
                    EXPIRED_ENDPOINT_ERROR,
                    f"data endpoint generation {generation} expired; call GetDataEndpoint again",
                )
            action()
        except ApiError as e:
            self._send_error(e, close=True)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("client went away during %s", route)
            self.close_connection = True

    # -- routes -----------------------------------------------------------------

    def _put_media(self) -> None:
        name, arn = self._resolve(
            self.headers.get("x-amzn-stream-name"), self.headers.get("x-amzn-stream-arn")
        )
        session = self._put_media_session(arn)
        self.send_response(200)
        self._common_headers("application/json")
        self.end_headers()
        self.ctx.store.producer_connected(arn)
        try:
            for data in self._body_chunks():
                self._write_acks(session.feed(data))
                if session.failed:
                    self.close_connection = True
                    break
            else:
                self._write_acks(session.close())
            self._write_chunk(b"")
        finally:
            session.abandon()
            self.ctx.store.producer_disconnected(arn)
        logger.info("PutMedia on %s: %d fragments stored", name, session.fragments_stored)

    def _put_media_session(self, arn: str) -> PutMediaSession:
        timecode_type = self.headers.get("x-amzn-fragment-timecode-type")
        if timecode_type not in TIMECODE_TYPES:
            allowed = "|".join(TIMECODE_TYPES)
            raise invalid_argument(
                f"x-amzn-fragment-timecode-type must be {allowed}, got {timecode_type!r}"
            )
        start = self.headers.get("x-amzn-producer-start-timestamp")
        try:
            start_ms = round(float(start) * 1000) if start else now_ms()
        except ValueError as e:
            raise invalid_argument(f"bad x-amzn-producer-start-timestamp {start!r}") from e
        return PutMediaSession(
            self.ctx.store,
            arn,
            timecode_type=timecode_type,
            producer_start_ms=start_ms,
            clock_ms=now_ms,
        )

    def _get_media(self) -> None:
        body = self._read_json()
        name, arn = self._resolve(body.get("StreamName"), body.get("StreamARN"))
        start = start_point(
            self.ctx.store,
            arn,
            body.get("StartSelector"),
            inclusive=self.ctx.options.fragment_selector_inclusive,
        )
        cut = self.ctx.faults.take_get_media_cut(name, arn)
        self.send_response(200)
        self._common_headers("video/webm")
        self.end_headers()
        budget = _Budget(cut.after_fragments, cut.after_bytes) if cut else _Budget(None, None)
        after, started = start.after, False
        idle = self.ctx.options.get_media_idle_timeout
        while (fragment := self.ctx.store.wait_next(arn, after, idle)) is not None:
            after = fragment.number
            if not started and not start.admits(fragment.head):
                continue
            started = True
            if not self._stream_fragment(arn, fragment, budget):
                return
        self._write_chunk(b"")

    def _stream_fragment(self, arn: str, fragment: LiveFragment, budget: _Budget) -> bool:
        """Send one fragment as it is stored; False once the connection was cut."""
        if not self._send_budgeted(render_head(fragment.head), budget):
            return False
        cluster_sent = trailing_sent = 0
        while True:
            progress = self.ctx.store.follow(arn, fragment, cluster_sent, trailing_sent)
            cluster_sent += len(progress.cluster)
            trailing_sent += len(progress.trailing_tags)
            data = progress.cluster + b"".join(progress.trailing_tags)
            if data and not self._send_budgeted(data, budget):
                return False
            if progress.state == COMPLETE:
                tail = render_tail(fragment.head, now_ms())
                return self._send_budgeted(tail, budget, fragment_end=True)
            if progress.state != OPEN:  # the producer broke off inside it, or shutdown
                logger.info("fragment %d %s: cutting GetMedia", fragment.number, progress.state)
                self._cut()
                return False

    def _get_media_for_fragment_list(self) -> None:
        body = self._read_json()
        _, arn = self._resolve(body.get("StreamName"), body.get("StreamARN"))
        fragments = select_fragments(self.ctx.store, arn, body.get("Fragments"))
        payload = b"".join(render_fragment(fragment, now_ms()) for fragment in fragments)
        self.send_response(200)
        self._common_headers("video/webm", length=len(payload))
        self.end_headers()
        self.wfile.write(payload)

    def _list_fragments(self) -> None:
        body = self._read_json()
        _, arn = self._resolve(body.get("StreamName"), body.get("StreamARN"))
        self._send_json(200, list_fragments(self.ctx.store, arn, body))

    def _control_faults(self) -> None:
        spec = self._read_json()
        try:
            self._send_json(200, self.ctx.faults.apply(spec))
        except (TypeError, ValueError) as e:
            raise invalid_argument(f"bad fault settings: {e}") from e

    # -- plumbing ---------------------------------------------------------------

    def _resolve(self, name: Any, arn: Any) -> tuple[str, str]:
        if not name and not arn:
            raise invalid_argument("StreamName or StreamARN is required")
        match = _REGION.search(self.headers.get("Authorization", ""))
        region = match.group(1) if match else self.ctx.options.region
        return self.ctx.resolve(name or None, arn or None, region)

    def _send_budgeted(self, data: bytes, budget: _Budget, *, fragment_end: bool = False) -> bool:
        """Send part of a fragment; on a cut fault send what the budget allows, then drop."""
        allowed = budget.take(len(data))
        if allowed:
            self._write_chunk(data[:allowed])
        if allowed == len(data) and fragment_end:
            budget.fragment_sent()
        if allowed == len(data) and not budget.exhausted:
            return True
        logger.info("fault: cutting a GetMedia connection")
        self._cut()
        return False

    def _cut(self) -> None:
        """Drop the connection without ending the chunked body: the client sees it broken."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _write_acks(self, acks: list[dict[str, Any]]) -> None:
        for ack in acks:
            self._write_chunk(json.dumps(ack, separators=(",", ":")).encode() + b"\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body as it arrives (chunked or Content-Length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            yield from _dechunk(self.rfile)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read1(min(remaining, _READ_SIZE))
            if not data:
                return
            remaining -= len(data)
            yield data

    def _read_json(self) -> dict[str, Any]:
        raw = b"".join(self._body_chunks())
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise ApiError(400, "SerializationException", f"body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "SerializationException", "body must be a JSON object")
        return body

    def _common_headers(self, content_type: str, length: int | None = None) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))

    def _send_text(self, status: int, text: str) -> None:
        payload = text.encode()
        self.send_response(status)
        self._common_headers("text/plain; version=0.0.4", length=len(payload))
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self._common_headers("application/json", length=len(payload))
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, error: ApiError, *, close: bool) -> None:
        """An AWS-style JSON error; closes the connection if the body may be unread."""
        payload = json.dumps(
            {"__type": error.code, "message": error.message, "Message": error.message}
        ).encode()
        self.send_response(error.status)
        self._common_headers("application/json", length=len(payload))
        self.send_header("x-amzn-ErrorType", error.code)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)


class _Budget:
    """What a cut-connection fault still lets through: fragments and bytes."""

    def __init__(self, fragments: int | None, size: int | None) -> None:
        self.fragments = fragments
        self.size = size

    @property
    def exhausted(self) -> bool:
        return self.fragments == 0 or self.size == 0

    def take(self, size: int) -> int:
        """Bytes of a `size`-byte piece of a fragment that may still be sent."""
        if self.fragments == 0:
            return 0
        allowed = size if self.size is None else min(size, self.size)
        if self.size is not None:
            self.size -= allowed
        return allowed

    def fragment_sent(self) -> None:
        """A whole fragment went out."""
        if self.fragments is not None:
            self.fragments -= 1


def _split_path(path: str) -> tuple[int | None, str]:
    match = _GENERATION.match(path)
    if match is None:
        return None, path
    return int(match.group(1)), match.group(2)


def _dechunk(stream: Any) -> Iterator[bytes]:
    """Decode an HTTP/1.1 chunked body; ends quietly if the peer disconnects."""
    while True:
        line = stream.readline(1024)
        if not line:
            return
        try:
            remaining = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            return
        if remaining == 0:
            while stream.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return
        while remaining > 0:
            data = stream.read1(min(remaining, _READ_SIZE))
            if not data:
                return
            remaining -= len(data)
            yield data
        stream.readline(1024)
