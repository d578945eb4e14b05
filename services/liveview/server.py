"""The live view's HTTP server on 127.0.0.1: the page, its JSON board, the recordings."""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from services.liveview.handler import LiveView
from services.liveview.page import PAGE

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


class Handler(BaseHTTPRequestHandler):
    """GET /, /api/calls?after=N (long poll), /recordings/<key>, /healthz."""

    view: LiveView

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
        elif url.path == "/api/calls":
            after = _after(url.query)
            board = self.view.wait_for_change(after, timeout_s=10.0 if after >= 0 else 0.0)
            self._send(200, "application/json", json.dumps(board).encode())
        elif url.path.startswith("/recordings/"):
            self._recording(unquote(url.path.removeprefix("/recordings/")))
        elif url.path == "/healthz":
            self._send(200, "text/plain", b"ok\n")
        else:
            self._send(404, "text/plain", b"not found\n")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def _recording(self, key: str) -> None:
        body = self.view.recording(key)
        if body is None:
            self._send(404, "text/plain", b"no such recording\n")
            return
        self._send(200, "audio/wav", body)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _after(query: str) -> int:
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if name == "after" and value.lstrip("-").isdigit():
            return int(value)
    return -1


def serve(view: LiveView, port: int) -> ThreadingHTTPServer:
    """An HTTP server for `view` on 127.0.0.1 (port 0: any free port); not yet serving."""
    handler = type("BoundHandler", (Handler,), {"view": view})
    server = ThreadingHTTPServer((HOST, port), handler)
    server.daemon_threads = True
    return server
