"""The live view in headless Chromium while the sample call plays through the four services.

Chromium is driven over its DevTools protocol (a small client on `wsproto`).
Asserted: the page lists the call live, final transcript lines of both speakers
appear while the call is still playing, partials are replaced by finals, and
once the call ended its recording (one stereo WAV, shown when RecordingStored
arrives) loads in an `<audio>` element with a duration and plays. A screenshot
is saved in the test's tmp dir, and to docs/liveview.png with
`CALLSTREAM_SAVE_SCREENSHOT=1` (how the README's is made).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callstream_emulator.demo import adopt_env, local_env, play_sample_call
from callstream_emulator.processes import REPO_ROOT, ServiceGroup
from callstream_emulator.provision import provision

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs the Debian `chromium` package (apt-get install chromium)"
    ),
]
SPEED = 1.0  # live: the transcript must show while the call is still playing
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
    "--window-size=1280,900",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]
SCREENSHOT = REPO_ROOT / "docs" / "liveview.png"


class DevTools:
    """Just enough of the Chrome DevTools protocol: one page, evaluate, screenshot."""

    def __init__(self, ws_url: str) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        match = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        assert match, ws_url
        self.sock = socket.create_connection((match[1], int(match[2])), timeout=30)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"{match[1]}:{match[2]}", target=match[3])))
        self._handshake()
        self.ids = itertools.count(1)
        self.buffer = ""
        self.session: str | None = None

    def _handshake(self) -> None:
        from wsproto.events import AcceptConnection, RejectConnection

        while True:
            self.ws.receive_data(self.sock.recv(1 << 16))
            for event in self.ws.events():
                assert not isinstance(event, RejectConnection), event
                if isinstance(event, AcceptConnection):
                    return

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        from wsproto.events import Message

        message_id = next(self.ids)
        request: dict[str, Any] = {"id": message_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            request["sessionId"] = self.session
        self.sock.sendall(self.ws.send(Message(data=json.dumps(request))))
        while True:
            for reply in self._messages():
                if reply.get("id") == message_id:
                    assert "error" not in reply, reply
                    result: dict[str, Any] = reply["result"]
                    return result

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def _messages(self) -> Iterator[dict[str, Any]]:
        from wsproto.events import Ping, TextMessage

        self.ws.receive_data(self.sock.recv(1 << 20))
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self.buffer += event.data
                if event.message_finished:
                    text, self.buffer = self.buffer, ""
                    yield json.loads(text)
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))


@pytest.fixture(scope="module")
def stack(emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    workdir = tmp_path_factory.mktemp("liveview")
    port = _free_port()
    env = {**local_env(emulator, workdir), "CALLSTREAM_LIVEVIEW_PORT": str(port)}
    adopt_env(env)
    provision(env)
    group = ServiceGroup(env, workdir / "logs")
    group.start()
    group.start(("liveview",))
    _wait_http(f"http://127.0.0.1:{port}/healthz", group)
    _wait_consuming(group)
    yield {**env, "url": f"http://127.0.0.1:{port}/"}
    group.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_consuming(group: ServiceGroup) -> None:
    """Every consumer is past start-up (the transcriber has loaded its model)."""
    deadline = time.monotonic() + 240
    for process in group.processes:
        if process.name == "liveview":
            continue
        while "consuming " not in process.log_path.read_text():
            assert process.alive(), process.log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, f"{process.name} did not start consuming"
            time.sleep(0.2)


def _wait_http(url: str, group: ServiceGroup) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert not group.dead(), [p.log_path.read_text()[-2000:] for p in group.dead()]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture
def browser() -> Iterator[DevTools]:
    profile = tempfile.mkdtemp(prefix="chromium-")
    process = subprocess.Popen(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield DevTools(_devtools_url(process))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_url(process: subprocess.Popen[str]) -> str:
    assert process.stderr is not None
    for line in process.stderr:
        if "DevTools listening on" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep it drained
            return line.split("DevTools listening on", 1)[1].strip()
    raise AssertionError(f"chromium exited ({process.wait()}) without a DevTools endpoint")


STATE_JS = """(() => {
  const call = document.querySelector(`section.call[data-contact="%s"]`);
  if (!call) return null;
  const lines = [...call.querySelectorAll(".line")].map(e => ({
    speaker: e.querySelector(".who").textContent, text: e.querySelector(".text").textContent,
    final: e.classList.contains("final"), segment: e.dataset.segment}));
  const audio = [...call.querySelectorAll("audio")].map(a => ({
    key: a.dataset.key, duration: Number(a.dataset.duration || 0), ready: a.readyState}));
  return {live: !!call.querySelector(".state.live"), lines, audio};
})()"""


def _wait_for(browser: DevTools, contact: str, done: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    state: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        state = browser.evaluate(STATE_JS % contact)
        if state is not None and done(state):
            return state
        time.sleep(0.25)
    raise AssertionError(f"the page did not get there within {timeout_s} s: {state}")


def test_live_view_shows_the_transcript_as_the_call_plays_then_its_recordings(
    stack: dict[str, str], browser: DevTools, tmp_path: Path
) -> None:
    browser.open(stack["url"])
    contact = "liveview-" + os.urandom(4).hex()
    player = threading.Thread(
        target=play_sample_call, args=(stack,), kwargs={"speed": SPEED, "contact_id": contact}
    )
    player.start()
    try:
        live = _wait_for(
            browser,
            contact,
            lambda s: s["live"] and {"customer", "agent"} <= {x["speaker"] for x in s["lines"]},
            timeout_s=180,
        )
        assert player.is_alive(), "lines should appear while the call is still playing"
        assert all(line["text"] for line in live["lines"])
    finally:
        player.join()
    ended = _wait_for(
        browser,
        contact,
        lambda s: (
            not s["live"] and len(s["audio"]) == 1 and all(a["duration"] > 0 for a in s["audio"])
        ),
        timeout_s=180,
    )
    assert all(line["final"] for line in ended["lines"]), "every partial is replaced by its final"
    segments = [line["segment"] for line in ended["lines"]]
    assert len(segments) == len(set(segments))
    assert all(40 < a["duration"] < 60 for a in ended["audio"]), ended["audio"]  # a 48.5 s call
    played = browser.evaluate(
        f"(async () => {{ const a = document.querySelector("
        f'`section[data-contact="{contact}"] audio`);'
        " await a.play(); await new Promise(r => setTimeout(r, 1500)); a.pause();"
        " return a.currentTime; })()"
    )
    assert played > 0.5
    shot = browser.call("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "liveview.png").write_bytes(png)
    if os.environ.get("CALLSTREAM_SAVE_SCREENSHOT") == "1":
        SCREENSHOT.write_bytes(png)
