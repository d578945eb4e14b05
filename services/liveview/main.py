"""Live view: a web page on 127.0.0.1 with the calls in progress and their transcripts.

Follows the calls stream (CallStarted), the transcripts stream (segments,
CallEnded) and the recordings stream (RecordingStored: a recording is shown
once the recorder says it is complete, S3 is never polled) with `StreamTail`
(no leases: every viewer sees everything), and serves the page, its JSON
board and the recordings (proxied from S3, so the bucket stays private).
The recordings stream is created if missing (the viewer may start first).

A failed poll is retried, unless `callstream.awserrors` calls it a
configuration fault (a missing stream or bucket, access denied): the view
then stops and exits with status 3, as the consumer services do.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream import log as logsetup
from callstream.awserrors import classify
from callstream.bus.tail import StreamTail
from callstream.config import BusSettings, Env, recordings_stream
from callstream.errors import ConfigurationFault, PoisonRecordError
from callstream.service import EXIT_CONFIGURATION_FAULT, ensure_stream, load_settings
from services.liveview.core import CallBoard
from services.liveview.page import PAGE

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


@dataclass(frozen=True)
class LiveViewSettings:
    """Where to listen and which streams to follow."""

    bus: BusSettings
    port: int
    recordings_stream: str
    from_latest: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LiveViewSettings:
        """CALLSTREAM_LIVEVIEW_PORT/_FROM, CALLSTREAM_RECORDINGS_STREAM (RecordingStored
        names each recording's bucket and key)."""
        env = Env(environ)
        return cls(
            bus=BusSettings.from_env(env),
            port=env.integer("CALLSTREAM_LIVEVIEW_PORT", 8080, minimum=0, maximum=65535),
            recordings_stream=recordings_stream(env),
            from_latest=env.choice("CALLSTREAM_LIVEVIEW_FROM", "start", ("start", "latest"))
            == "latest",
        )


class LiveView:
    """The board, the stream followers and the S3 look-ups, shared by the HTTP threads."""

    def __init__(self, settings: LiveViewSettings) -> None:
        self.settings = settings
        self.board = CallBoard()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.fault: ConfigurationFault | None = None  # what stopped `follow`, if anything
        region = settings.bus.region
        self.s3 = aws.client("s3", region)
        kinesis = aws.client("kinesis", region)
        ensure_stream(kinesis, settings.recordings_stream)
        latest = settings.from_latest
        self.tails = [
            StreamTail(kinesis, settings.bus.calls_stream, latest=latest),
            StreamTail(kinesis, settings.bus.transcripts_stream, latest=latest),
            StreamTail(kinesis, settings.recordings_stream, latest=latest),
        ]

    def follow(self, stop: threading.Event) -> None:
        """Poll the streams until `stop`; a failed poll is logged and retried,
        a configuration fault is kept in `fault` and sets `stop`."""
        while not stop.is_set():
            try:
                busy = self._poll_streams()
            except (ClientError, BotoCoreError) as e:
                error = classify(e, what="live view poll")
                if isinstance(error, ConfigurationFault):
                    log.critical("configuration fault, stopping: %s", error)
                    self.fault = error
                    stop.set()
                    return
                log.warning("poll failed, retrying: %s", error)
                busy = False
            if not busy:
                stop.wait(0.3)

    def wait_for_change(self, after: int, timeout_s: float) -> dict[str, Any]:
        """The board once its version differs from `after` (or after the timeout)."""
        with self.changed:
            self.changed.wait_for(lambda: self.board.version != after, timeout=timeout_s)
            return self.board.snapshot()

    def recording(self, key: str) -> Any | None:
        """The S3 object of a recording on the board, or None."""
        with self.lock:
            bucket = self.board.bucket_of(key)
        if bucket is None:
            return None
        return self.s3.get_object(Bucket=bucket, Key=key)

    def _poll_streams(self) -> bool:
        events = [e for tail in self.tails for e in tail.poll()]
        with self.changed:
            for event in events:
                if not isinstance(event, PoisonRecordError):
                    self.board.apply(event)
            if events:
                self.changed.notify_all()
        return bool(events)


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
        try:
            obj = self.view.recording(key)
        except (ClientError, BotoCoreError) as e:
            log.warning("recording %s unavailable: %s", key, e)
            obj = None
        if obj is None:
            self._send(404, "text/plain", b"no such recording\n")
            return
        self._send(200, "audio/wav", obj["Body"].read())

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


def main() -> None:
    """Entry point: `python -m services.liveview.main`."""
    logsetup.configure("liveview")
    settings = load_settings(LiveViewSettings.from_env)
    view = LiveView(settings)
    server = serve(view, settings.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=view.follow, args=(stop,), name="follow", daemon=True).start()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log.info("live view on http://%s:%d/", HOST, server.server_address[1])
    print(f"live view: http://{HOST}:{server.server_address[1]}/", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    if view.fault is not None:
        print(f"liveview stopped by a configuration fault: {view.fault}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIGURATION_FAULT)


if __name__ == "__main__":
    main()
