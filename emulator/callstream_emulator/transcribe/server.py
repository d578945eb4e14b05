"""The server's lifecycle: TLS, the relay and hypercorn on a background thread's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, cast

import hypercorn.asyncio
import hypercorn.config

from callstream.asr.port import SpeechEngine
from callstream_emulator.tls import TlsFiles, make_local_tls
from callstream_emulator.transcribe.app import TranscribeApp
from callstream_emulator.transcribe.faults import Fault, Ledger, StreamRecord
from callstream_emulator.transcribe.relay import HOST, Relay
from callstream_emulator.transcribe.session import Timing

_log = logging.getLogger(__name__)


class ServerAddress(NamedTuple):
    """Where the endpoint listens and the CA file a client must trust to reach it."""

    url: str
    ca_file: Path


class LocalTranscribeServer:
    """The endpoint on 127.0.0.1, run by a background thread with its own event loop.

    `start()` returns the `https://127.0.0.1:PORT` URL and the CA file to trust
    (set `SSL_CERT_FILE` to it before creating an awscrt client); `stop()` ends
    every connection and removes the TLS material. Faults given here or through
    `inject()` are handed to streams in the order the streams open.
    """

    def __init__(
        self,
        engine: SpeechEngine,
        *,
        faults: Iterable[Fault] = (),
        poll_interval_s: float = 0.05,
        drain_timeout_s: float = 10.0,
        idle_timeout_s: float = 15.0,
    ) -> None:
        self._engine = engine
        self._ledger = Ledger(faults)
        self._timing = Timing(poll_interval_s, drain_timeout_s, idle_timeout_s)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._shutdown: asyncio.Event | None = None
        self._relay: Relay | None = None
        self._address: ServerAddress | None = None
        self._failure: BaseException | None = None
        self._tls_dir: Path | None = None

    @property
    def address(self) -> ServerAddress:
        if self._address is None:
            raise RuntimeError("the local Transcribe endpoint is not running")
        return self._address

    def client_env(self) -> dict[str, str | None]:
        """Environment for an unchanged SDK client of this endpoint (None: unset it).

        Dummy static credentials (the endpoint does not check signatures) and
        the CA to trust, which awscrt reads when a client's TLS context is made.
        """
        return {
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_CONFIG_FILE": None,
            "AWS_ACCESS_KEY_ID": "AKIDLOCALTEST",
            "AWS_SECRET_ACCESS_KEY": "local-test-secret",
            "SSL_CERT_FILE": str(self.address.ca_file),
        }

    @property
    def streams(self) -> list[StreamRecord]:
        """Snapshots of every stream started so far, in order."""
        return self._ledger.records()

    def inject(self, fault: Fault) -> None:
        """Give `fault` to the next stream that opens without one."""
        self._ledger.add_fault(fault)

    def start(self, timeout_s: float = 10.0) -> ServerAddress:
        if self._thread is not None:
            raise RuntimeError("the local Transcribe endpoint was already started")
        self._tls_dir = Path(tempfile.mkdtemp(prefix="callstream-transcribe-"))
        tls = make_local_tls(self._tls_dir)
        self._thread = threading.Thread(
            target=self._run, args=(tls,), name="local-transcribe", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._address is None:
            self.stop()
            raise RuntimeError(f"local Transcribe endpoint did not start: {self._failure!r}")
        _log.info("local Transcribe endpoint at %s", self._address.url)
        return self._address

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(self._begin_shutdown)
            thread.join(timeout_s)
            if thread.is_alive():
                _log.warning("local Transcribe endpoint still running after %.1f s", timeout_s)
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
        self._address = None

    def __enter__(self) -> LocalTranscribeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, tls: TlsFiles) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(tls))
            loop.run_until_complete(loop.shutdown_default_executor())
        except BaseException as error:
            self._failure = error
            _log.exception("local Transcribe endpoint failed")
        finally:
            loop.close()
            self._ready.set()

    async def _serve(self, tls: TlsFiles) -> None:
        self._shutdown = asyncio.Event()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((HOST, 0))
        listener.listen()  # before hypercorn adopts it, so early clients queue up
        self._relay = Relay(listener.getsockname()[1])
        port = await self._relay.start()
        app = TranscribeApp(self._engine, self._ledger, self._relay, self._timing)
        config = _hypercorn_config(tls, listener.detach())
        self._address = ServerAddress(f"https://{HOST}:{port}", tls.ca_file)
        self._ready.set()
        try:
            await hypercorn.asyncio.serve(
                cast(Any, app), config, shutdown_trigger=self._shutdown.wait, mode="asgi"
            )
        finally:
            await self._relay.stop()

    def _begin_shutdown(self) -> None:
        # Dropping connections first spares hypercorn's graceful wait for idle clients.
        if self._relay is not None:
            for port in list(self._relay.ports()):
                self._relay.drop(port)
        if self._shutdown is not None:
            self._shutdown.set()


def _hypercorn_config(tls: TlsFiles, listener_fd: int) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    config.bind = [f"fd://{listener_fd}"]
    config.certfile = str(tls.cert_file)
    config.keyfile = str(tls.key_file)
    config.alpn_protocols = ["h2"]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = _log
    return config
