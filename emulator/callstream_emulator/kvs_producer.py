"""A minimal KVS PutMedia client: the request real KVS accepts, on one socket.

boto3 has no PutMedia (it needs a streaming request body and a streaming
response at once), so this sends it by hand: an HTTP/1.1 chunked POST to
`<data endpoint>/putMedia`, signed with SigV4 by botocore (service
`kinesisvideo`, empty-payload hash, as the producer SDKs do), reading the
JSON ACK events that come back while the body is still being sent.
The caller's iterable paces the chunks (real-time playback) in the calling
thread; a reader thread parses the ACKs as they arrive. Over TLS the two
threads take turns on the socket (an SSL object is not safe for concurrent use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest

logger = logging.getLogger(__name__)

Ack = dict[str, Any]
_RECV = 64 * 1024


class KvsMediaError(Exception):
    """PutMedia was refused with an HTTP error (status, AWS error code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"PutMedia failed: HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def put_media(
    data_endpoint: str,
    stream_arn_or_name: str,
    chunks: Iterable[bytes],
    *,
    region: str,
    credentials: Any,
    timecode_type: str = "ABSOLUTE",
    producer_start_ms: int | None = None,
    on_ack: Callable[[Ack], None] | None = None,
    timeout: float = 30.0,
) -> list[Ack]:
    """Stream `chunks` (MKV bytes) to KVS PutMedia; return every ACK event received.

    `data_endpoint` comes from GetDataEndpoint(APIName=PUT_MEDIA); a stream
    ARN goes in `x-amzn-stream-arn`, anything else in `x-amzn-stream-name`.
    `credentials` is a botocore Credentials object (e.g.
    `boto3.Session().get_credentials()`). `on_ack` sees each ACK as it comes,
    in the reader thread. ERROR ACKs are returned, not raised; an HTTP error
    status raises KvsMediaError; no end of response `timeout` seconds after the
    body was sent raises TimeoutError.
    """
    url = data_endpoint.rstrip("/") + "/putMedia"
    start_ms = time.time_ns() // 1_000_000 if producer_start_ms is None else producer_start_ms
    headers = _signed_headers(url, stream_arn_or_name, timecode_type, start_ms, region, credentials)
    with _connect(url, timeout) as sock:
        turns: Any = (
            threading.Lock() if isinstance(sock, ssl.SSLSocket) else contextlib.nullcontext()
        )
        reader = _ResponseReader(sock, turns, on_ack)
        with turns:
            sock.sendall(_request_head(url, headers))
        reader.start()
        try:
            _send_body(sock, turns, chunks, reader)
        finally:
            reader.finish(timeout)
    return reader.acks


def _signed_headers(
    url: str,
    stream: str,
    timecode_type: str,
    start_ms: int,
    region: str,
    credentials: Any,
) -> dict[str, str]:
    stream_header = "x-amzn-stream-arn" if stream.startswith("arn:") else "x-amzn-stream-name"
    request = AWSRequest(
        method="POST",
        url=url,
        data=b"",
        headers={
            stream_header: stream,
            "x-amzn-fragment-timecode-type": timecode_type,
            "x-amzn-producer-start-timestamp": f"{start_ms // 1000}.{start_ms % 1000:03d}",
            "Host": urlsplit(url).netloc,
            "Accept": "*/*",
        },
    )
    SigV4Auth(credentials, "kinesisvideo", region).add_auth(request)
    signed = {name: str(value) for name, value in request.headers.items()}
    signed["Transfer-Encoding"] = "chunked"
    signed["Connection"] = "keep-alive"
    return signed


def _request_head(url: str, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _connect(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    sock = socket.create_connection((parts.hostname or "", port), timeout=timeout)
    if secure:
        context = ssl.create_default_context()
        return context.wrap_socket(sock, server_hostname=parts.hostname)
    return sock


def _send_body(
    sock: socket.socket, turns: Any, chunks: Iterable[bytes], reader: _ResponseReader
) -> None:
    """Send each chunk as it comes; stop early if the server ended the exchange."""
    try:
        for chunk in chunks:
            if reader.complete:
                logger.info("PutMedia ended by the server before the body was sent")
                return
            if chunk:
                with turns:
                    sock.sendall(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
        with turns:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        logger.info("PutMedia connection closed by the server while sending")


class _ResponseReader:
    """Reader thread parsing the PutMedia response: status, headers, chunked ACKs."""

    def __init__(
        self, sock: socket.socket, turns: Any, on_ack: Callable[[Ack], None] | None
    ) -> None:
        self.acks: list[Ack] = []
        self.complete = False
        self._sock = sock
        self._turns = turns
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="put-media-acks", daemon=True)
        self._error: BaseException | None = None
        self._on_ack = on_ack
        self._raw = bytearray()  # bytes not yet parsed as HTTP framing
        self._text = ""  # decoded body not yet parsed as JSON
        self._status: int | None = None
        self._headers: dict[str, str] = {}
        self._chunk_left = 0
        self._body = bytearray()  # whole body of an error response

    def start(self) -> None:
        """Start reading in the background."""
        self._thread.start()

    def finish(self, timeout: float) -> None:
        """Wait for the end of the response; re-raise what the reader hit."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            raise TimeoutError(f"PutMedia response did not end within {timeout}s")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while not self.complete and not self._stop.is_set():
                if not _readable(self._sock, 0.02):
                    continue
                with self._turns:
                    data = _recv(self._sock)
                if not data:
                    self._eof()
                    return
                self._feed(data)
        except BaseException as e:  # handed to the sending thread by finish()
            self._error = e

    def _eof(self) -> None:
        if self._status is None:
            raise KvsMediaError(0, "ConnectionClosed", "no response from the media endpoint")
        self.complete = True
        self._check_status()

    def _feed(self, data: bytes) -> None:
        self._raw += data
        if self._status is None and not self._parse_head():
            return
        self._parse_chunks()
        if self.complete:
            self._check_status()

    def _parse_head(self) -> bool:
        end = self._raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = self._raw[:end].decode("latin-1").split("\r\n")
        self._status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self._headers[name.strip().lower()] = value.strip()
        del self._raw[: end + 4]
        if "chunked" not in self._headers.get("transfer-encoding", ""):
            self._chunk_left = int(self._headers.get("content-length", "0"))
        return True

    def _parse_chunks(self) -> None:
        if "chunked" not in self._headers.get("transfer-encoding", ""):
            self._body_bytes(bytes(self._raw[: self._chunk_left]))
            self._chunk_left -= min(len(self._raw), self._chunk_left)
            self._raw.clear()
            self.complete = self._chunk_left == 0
            return
        while not self.complete:
            if self._chunk_left:
                take = bytes(self._raw[: self._chunk_left])
                if not take:
                    return
                del self._raw[: len(take)]
                self._chunk_left -= len(take)
                self._body_bytes(take)
                continue
            line_end = self._raw.find(b"\r\n", 2 if self._raw.startswith(b"\r\n") else 0)
            if line_end < 0:
                return
            size_line = bytes(self._raw[:line_end]).strip()
            del self._raw[: line_end + 2]
            self._chunk_left = int(size_line.split(b";")[0], 16)
            self.complete = self._chunk_left == 0

    def _body_bytes(self, data: bytes) -> None:
        if self._status != 200:
            self._body += data
            return
        self._text += data.decode("utf-8")
        decoder = json.JSONDecoder()
        while True:
            stripped = self._text.lstrip()
            if not stripped:
                self._text = ""
                return
            try:
                ack, end = decoder.raw_decode(stripped)
            except ValueError:
                self._text = stripped
                return
            self._text = stripped[end:]
            self.acks.append(ack)
            if self._on_ack is not None:
                self._on_ack(ack)

    def _check_status(self) -> None:
        if self._status == 200:
            return
        code = self._headers.get("x-amzn-errortype", "").split(":")[0]
        message = self._body.decode("utf-8", "replace")
        try:
            parsed = json.loads(message)
            code = code or str(parsed.get("__type", "")).split("#")[-1]
            message = parsed.get("message") or parsed.get("Message") or message
        except ValueError:
            pass
        raise KvsMediaError(self._status or 0, code or "UnknownError", message)


def _readable(sock: socket.socket, wait: float) -> bool:
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    ready, _, _ = select.select([sock], [], [], wait)
    return bool(ready)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(_RECV)
    except (ConnectionResetError, BrokenPipeError):
        return b""
