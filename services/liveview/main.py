"""Live view: a web page on 127.0.0.1 with the calls in progress and their transcripts.

Wiring only: settings -> the streams and the recordings (`adapters`) -> the
board (`handler.LiveView`) -> its follower thread and HTTP server (`server`).
A configuration fault stops the view with status 3, as the consumer services do.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from callstream import aws
from callstream import log as logsetup
from callstream.service import EXIT_CONFIGURATION_FAULT, load_settings
from services.liveview.adapters import CallStreams, RecordingObjects
from services.liveview.handler import LiveView
from services.liveview.server import HOST, serve
from services.liveview.settings import LiveViewSettings

log = logging.getLogger(__name__)


def main() -> None:
    """Entry point: `python -m services.liveview.main`."""
    logsetup.configure("liveview")
    settings = load_settings(LiveViewSettings.from_env)
    region = settings.bus.region
    streams = CallStreams(aws.client("kinesis", region), settings)
    view = LiveView(streams, RecordingObjects(aws.client("s3", region)))
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
