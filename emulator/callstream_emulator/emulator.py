"""The embedded emulator: every AWS service callstream needs, on 127.0.0.1.

`Emulator` starts, in this process:
- a moto server (Kinesis Data Streams, DynamoDB, S3, the KVS control plane),
  patched by `moto_patches` while it runs, with Kinesis's per-shard quotas
  (`kinesis_quotas`, on by default) and enhanced fan-out (`kinesis_fanout`:
  SubscribeToShard is answered by a WSGI layer in front of moto, on the same port);
- the KVS media endpoint (`kvs_media`), which GetDataEndpoint points at.

Services reach both only through boto3 and `AWS_ENDPOINT_URL` (see `env()`),
the same code path as against LocalStack or real AWS. `run_forever()` backs
`python -m callstream_emulator`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

from callstream_emulator import moto_patches
from callstream_emulator.faults import Faults
from callstream_emulator.kinesis_fanout import FanoutHub, FanoutSettings, WsgiApp
from callstream_emulator.kinesis_quotas import KinesisQuotas
from callstream_emulator.kvs_api import ApiError, not_found
from callstream_emulator.kvs_media import KvsMediaServer, MediaOptions
from callstream_emulator.kvs_store import FragmentStore

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
DEFAULT_STATE_FILE = Path(".callstream/local.json")
# Switches read when an Emulator is made without the matching argument.
QUOTAS_ENV = "CALLSTREAM_EMULATOR_KINESIS_QUOTAS"  # on (default) | off
SUBSCRIPTION_ENV = "CALLSTREAM_EMULATOR_SUBSCRIPTION_S"  # seconds a SubscribeToShard lasts
DEFAULT_SUBSCRIPTION_S = 300.0  # AWS: 5 minutes
# Variables that would make boto3 ignore the emulator's credentials or endpoint.
CLEARED_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
)


class Emulator:
    """moto + KVS media endpoint on loopback ports; a context manager.

    Options: `region` (default us-east-1); `fragment_selector_inclusive` (GetMedia
    FRAGMENT_NUMBER starts WITH AfterFragmentNumber instead of after it, as some
    real-world reports describe; default False, as the API reference says);
    `get_media_idle_timeout` (a GetMedia with nothing left to send and no
    producer connected ends this many seconds after the last producer left, or
    after the request on a stream never produced to; default 1.0). `options`
    may be changed while running. `quiet` (silence
    werkzeug's per-request log lines, default True).

    Kinesis: `kinesis_quotas` enforces the per-shard quotas (default: on,
    unless CALLSTREAM_EMULATOR_KINESIS_QUOTAS=off); `subscription_s` is how long
    a SubscribeToShard lasts (default CALLSTREAM_EMULATOR_SUBSCRIPTION_S or
    300, as on AWS); `consumer_activation_s` how long a registered consumer
    stays CREATING (and a deregistered one DELETING). `quotas` and
    `fanout.settings` may be changed while running, also over the control
    route (see faults.py); `faults.clear()` puts them back to these values.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        media_port: int = 0,
        *,
        region: str = DEFAULT_REGION,
        fragment_selector_inclusive: bool = False,
        get_media_idle_timeout: float = 1.0,
        quiet: bool = True,
        kinesis_quotas: bool | None = None,
        subscription_s: float | None = None,
        consumer_activation_s: float = 0.5,
    ) -> None:
        host = "127.0.0.1" if host == "localhost" else host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"the emulator binds loopback addresses only, got {host!r}")
        self.host = host
        self.port = port
        self.media_port = media_port
        self.region = region
        self.quiet = quiet
        if kinesis_quotas is None:
            kinesis_quotas = _env_switch(QUOTAS_ENV, default=True)
        if subscription_s is None:
            subscription_s = _env_seconds(SUBSCRIPTION_ENV, DEFAULT_SUBSCRIPTION_S)
        self.quotas = KinesisQuotas(enabled=kinesis_quotas)
        self.fanout = FanoutHub(
            self.quotas,
            FanoutSettings(
                subscription_s=subscription_s, consumer_activation_s=consumer_activation_s
            ),
        )
        self.faults = Faults(self.quotas, self.fanout.settings)
        self.store = FragmentStore()
        self.options = MediaOptions(region, fragment_selector_inclusive, get_media_idle_timeout)
        self._moto: _MotoServer | None = None
        self._media: KvsMediaServer | None = None
        self._patches: moto_patches.PatchSet | None = None
        self._werkzeug_level: int | None = None
        self.start_seconds = 0.0

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> Emulator:
        """Start both servers and patch moto; raises if another Emulator runs here."""
        started = time.perf_counter()
        self._patches = moto_patches.apply(
            self.data_endpoint, self.faults, quotas=self.quotas, fanout=self.fanout
        )
        try:
            self._media = KvsMediaServer(
                self.store, self.faults, _moto_stream, self.options, self.host, self.media_port
            )
            self._media.start()
            self._quiet_werkzeug()
            self._moto = _MotoServer(self.host, self.port, verbose=False)
            self._moto.wrap = self.fanout.middleware
            self._moto.start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.perf_counter() - started
        logger.info(
            "emulator up in %.2fs: aws %s, kvs media %s, kinesis quotas %s",
            self.start_seconds,
            self.endpoint_url,
            self.media_url,
            "on" if self.quotas.enabled else "off",
        )
        return self

    def stop(self) -> None:
        """Stop both servers, reset moto's state and undo the patches."""
        if self._media is not None:
            self._media.stop()
            self._media = None
        self.fanout.close()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
            _reset_moto()
        if self._patches is not None:
            self._patches.revert()
            self._patches = None
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where things are -------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        """The moto server, for AWS_ENDPOINT_URL."""
        if self._moto is None:
            raise RuntimeError("emulator not started")
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    @property
    def media_url(self) -> str:
        """The KVS media endpoint's base URL (no endpoint generation)."""
        if self._media is None:
            raise RuntimeError("emulator not started")
        return self._media.url

    @property
    def control_url(self) -> str:
        """Base URL of the fault-control routes (`POST <control_url>/faults`)."""
        return f"{self.media_url}/_emulator"

    def data_endpoint(self) -> str:
        """What GetDataEndpoint returns now: media URL plus the endpoint generation."""
        return f"{self.media_url}/gen/{self.faults.endpoint_generation}"

    def env(self) -> dict[str, str]:
        """Environment a service process needs to use this emulator.

        Also remove the CLEARED_ENV names from that process's environment.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "APP_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "CALLSTREAM_EMULATOR_CONTROL_URL": self.control_url,
        }

    def _quiet_werkzeug(self) -> None:
        if self.quiet:
            werkzeug = logging.getLogger("werkzeug")
            self._werkzeug_level = werkzeug.level
            werkzeug.setLevel(logging.WARNING)


class _MotoServer(ThreadedMotoServer):
    """ThreadedMotoServer that binds in start() (so bind errors raise there) and frees its port.

    `wrap` (optional) wraps moto's WSGI app (the fan-out hub answers SubscribeToShard).
    """

    wrap: Callable[[WsgiApp], WsgiApp] | None = None

    def start(self) -> None:
        app: Any = DomainDispatcherApplication(create_backend_app)
        if self.wrap is not None:
            app = self.wrap(app)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        super().stop()
        if self._server is not None:
            self._server.server_close()


def _env_switch(name: str, *, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name} must be on or off, got {value!r}")


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return seconds


def _reset_moto() -> None:
    from moto.moto_api._internal.models import moto_api_backend

    moto_api_backend.reset()


def _moto_stream(name: str | None, arn: str | None, region: str) -> tuple[str, str]:
    """Resolve a KVS stream against moto's kinesisvideo backend: (name, ARN)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.kinesisvideo.exceptions import ResourceNotFoundException
    from moto.kinesisvideo.models import kinesisvideo_backends

    account = DEFAULT_ACCOUNT_ID
    if arn:
        parts = arn.split(":")
        if len(parts) < 6:
            raise ApiError(400, "InvalidArgumentException", f"malformed stream ARN {arn!r}")
        region, account = parts[3], parts[4]
    try:
        stream = kinesisvideo_backends[account][region]._get_stream(name or "", arn or "")
    except (ResourceNotFoundException, KeyError) as e:
        raise not_found(f"The requested stream {name or arn} is not found or not active.") from e
    return stream.stream_name, stream.arn


def run_forever(state_file: Path | str = DEFAULT_STATE_FILE, **options: Any) -> None:
    """Run an Emulator until SIGINT/SIGTERM; publish its endpoints in `state_file`.

    The state file (JSON: endpoint_url, media_url, control_url, region, pid,
    env) is written once the emulator is up and removed when it stops.
    """
    stop = threading.Event()
    previous = _on_signals(stop)
    path = Path(state_file)
    try:
        with Emulator(**options) as emulator:
            _write_state(path, emulator)
            _announce(emulator, path)
            while not stop.wait(0.5):
                pass
            print("callstream emulator: stopping", flush=True)
    finally:
        path.unlink(missing_ok=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_signals(stop: threading.Event) -> dict[int, Any]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def _write_state(path: Path, emulator: Emulator) -> None:
    state = {
        "endpoint_url": emulator.endpoint_url,
        "media_url": emulator.media_url,
        "control_url": emulator.control_url,
        "region": emulator.region,
        "pid": os.getpid(),
        "env": emulator.env(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(json.dumps(state, indent=2) + "\n")
    partial.replace(path)


def _announce(emulator: Emulator, path: Path) -> None:
    quotas = "on" if emulator.quotas.enabled else f"OFF ({QUOTAS_ENV})"
    print(f"callstream emulator up in {emulator.start_seconds:.2f}s", flush=True)
    print(f"  AWS (moto):  {emulator.endpoint_url}", flush=True)
    print(f"  KVS media:   {emulator.media_url}", flush=True)
    print(f"  Kinesis per-shard quotas: {quotas}", flush=True)
    print(f"  state file:  {path}", flush=True)
    for key, value in emulator.env().items():
        print(f"export {key}={value}", flush=True)
