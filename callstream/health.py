"""A tiny HTTP server for a service's health and metrics, on 127.0.0.1 only.

- `GET /healthz`: 200 while the process serves requests (liveness).
- `GET /readyz`: 200 when the `ready()` callback says so, else 503 (readiness:
  e.g. settings loaded, leases table reachable, shards held).
- `GET /metrics`: the Prometheus text of the service's `Metrics`.

Usually started by `callstream.metrics.start_observability(service, port)`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from callstream.metrics import Metrics

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


class HealthServer:
    """Serves /healthz, /readyz and /metrics from a daemon thread."""

    def __init__(
        self, metrics: Metrics, port: int = 0, ready: Callable[[], bool] | None = None
    ) -> None:
        self.metrics = metrics
        self.ready = ready or (lambda: True)
        handler = type("BoundHealthHandler", (_Handler,), {"server_ref": self})
        self._server = ThreadingHTTPServer((HOST, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )

    @property
    def port(self) -> int:
        """The port bound (useful with port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve in the background."""
        self._thread.start()
        log.info("health and metrics on http://%s:%d/", HOST, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def is_ready(self) -> bool:
        """The readiness callback; an exception counts as not ready."""
        try:
            return bool(self.ready())
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            return False


class _Handler(BaseHTTPRequestHandler):
    server_ref: HealthServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", "ok\n")
        elif path == "/readyz":
            ready = self.server_ref.is_ready()
            self._send(
                200 if ready else 503,
                "text/plain; charset=utf-8",
                "ready\n" if ready else "not ready\n",
            )
        elif path == "/metrics":
            body = self.server_ref.metrics.prometheus()
            self._send(200, "text/plain; version=0.0.4; charset=utf-8", body)
        else:
            self._send(404, "text/plain; charset=utf-8", "not found\n")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("health http: " + format, *args)

    def _send(self, status: int, content_type: str, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
