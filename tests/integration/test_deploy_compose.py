"""docker-compose.yml, compose.localstack.yml and the Dockerfile, checked without a Docker engine.

No Docker engine runs here, so: both compose files are validated against the
Compose Specification schema (check-jsonschema's vendored copy); every command
a container runs names a module that exists; and the emulator image's command,
read from the Dockerfile, runs here as a plain process (on free ports instead
of 4566/4567, which a developer's `callstream local up` may hold): its ports
answer, then SIGTERM stops it cleanly.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yml", "compose.localstack.yml")


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is in the dev extra")
    return found


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def stage_command(stage: str, instruction: str = "CMD") -> list[str]:
    """The exec-form command of a Dockerfile stage's (last) CMD or HEALTHCHECK."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    current, found = None, None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"] and "AS" in words:
            current = words[words.index("AS") + 1]
        elif current == stage and words[:1] == [instruction]:
            found = json.loads(line[line.index("[") :])
    assert found is not None, f"no {instruction} in stage {stage}"
    return list(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_both_compose_files_follow_the_compose_specification() -> None:
    files = [str(REPO / name) for name in COMPOSE_FILES]
    command = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_compose_command_runs_a_module_that_exists() -> None:
    for name, service in _compose()["services"].items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, name
    assert importlib.util.find_spec(stage_command("emulator")[2]) is not None
    assert importlib.util.find_spec(stage_command("service")[2]) is not None


def test_services_share_the_emulators_namespace_with_distinct_health_ports() -> None:
    services = _compose()["services"]
    ports = []
    for name, service in services.items():
        if name == "emulator":
            continue
        assert service["network_mode"] == "service:emulator", name
        if "CALLSTREAM_HEALTH_PORT" in service["environment"]:
            ports.append(service["environment"]["CALLSTREAM_HEALTH_PORT"])
    assert len(ports) == len(set(ports)) == 5


def test_the_emulator_images_command_serves_its_ports_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    command = stage_command("emulator")
    assert command[:3] == ["python", "-m", "callstream_emulator"]
    moto, media = _free_port(), _free_port()
    state = tmp_path / "local.json"
    swaps = {"--port": str(moto), "--media-port": str(media), "--state-file": str(state)}
    args = [swaps.get(command[i - 1], word) for i, word in enumerate(command)]
    process = subprocess.Popen(
        [sys.executable, *args[1:]], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not state.exists():
            assert process.poll() is None, "the emulator exited"
            assert time.monotonic() < deadline, "no state file after 60 s"
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{moto}/moto-api/", timeout=5) as answer:
            assert answer.status == 200
        healthcheck = stage_command("emulator", "HEALTHCHECK")
        assert healthcheck[:2] == ["python", "-c"]
        probe = healthcheck[2].replace("4566", str(moto))
        subprocess.run([sys.executable, "-c", probe], check=True, timeout=30)
        with socket.create_connection(("127.0.0.1", media), timeout=5):
            pass
        assert json.loads(state.read_text())["endpoint_url"] == f"http://127.0.0.1:{moto}"
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert not state.exists()
    assert shlex.join(command).startswith("python -m callstream_emulator")


def test_every_task_command_of_the_template_is_a_module_of_the_built_wheel(
    tmp_path: Path,
) -> None:
    from cfnlint.decode import decode

    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path)]
    subprocess.run([*command, str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("callstream-*.whl")
    with zipfile.ZipFile(wheel) as zipped:
        names = set(zipped.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line for line in zipped.read(metadata).decode().splitlines() if "Requires-Dist" in line
        ]
    # The wheel a service image installs carries no emulator and needs none of its parts.
    assert not [n for n in names if n.startswith("callstream_emulator/")]
    assert not [r for r in requires if any(x in r for x in ("moto", "hypercorn", "werkzeug"))]
    template, problems = decode(str(REPO / "deploy" / "callstream.yaml"))
    assert not problems and template is not None
    tasks = [r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"]
    assert len(tasks) == 5
    for task in tasks:
        (container,) = task["Properties"]["ContainerDefinitions"]
        python, flag, module = container["Command"]
        assert (python, flag) == ("python", "-m")
        assert module.replace(".", "/") + ".py" in names, module


def _stage_lines(stage: str) -> list[str]:
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    lines, current = [], None
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["FROM"] and "AS" in words:
            current = words[words.index("AS") + 1]
        elif current == stage:
            lines.append(line)
    return lines


def test_the_service_image_copies_only_the_runtime_wheel_and_the_emulator_image_both() -> None:
    builder = " ".join(_stage_lines("builder"))
    assert "--wheel-dir /wheels/runtime . " in builder
    assert "--wheel-dir /wheels/emulator ./emulator" in builder
    copies = [line.split() for line in _stage_lines("service") if "--from=builder" in line]
    assert [words[2] for words in copies] == ["/wheels/runtime"]
    emulator = " ".join(_stage_lines("emulator"))
    assert "/wheels/runtime/callstream-*.whl" in emulator
    assert "/wheels/emulator/callstream_emulator-*.whl" in emulator


def test_every_service_and_the_cli_import_without_the_emulator_or_moto() -> None:
    # As in a service image: neither callstream_emulator nor moto can be imported.
    script = """
import importlib, importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("callstream_emulator", "moto", "hypercorn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Absent())
for module in sys.argv[1:]:
    importlib.import_module(module)
from callstream.cli import main
sys.exit(main(["local", "up", "--state-file", "/nonexistent/dir/state.json"]))
"""
    mains = sorted(f"services.{p.parent.name}.main" for p in (REPO / "services").glob("*/main.py"))
    assert len(mains) == 6
    done = subprocess.run(
        [sys.executable, "-c", script, *mains, "services.ingest.lambda_function"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    # Every import worked; the emulator's own command says how to get it, exit 2.
    assert done.returncode == 2, done.stderr
    assert "needs the emulator" in done.stderr and "pip install ./emulator" in done.stderr
