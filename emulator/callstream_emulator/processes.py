"""Run the four services as separate OS processes (demo, integration tests).

Each service is `python -m services.<name>.main` with the emulator's
environment; its JSON log lines go to `<log_dir>/<name>-<n>.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

SERVICES = ("ingest", "transcriber", "recorder", "persister")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceProcess:
    """One running service instance."""

    def __init__(self, name: str, index: int, env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.index = index
        self.log_path = log_dir / f"{name}-{index}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        full_env = {**os.environ, **env, "CALLSTREAM_WORKER_ID": f"{name}-{index}-{os.getpid()}"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}.main"],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        """Still running."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, then SIGKILL if it does not go; return the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        return self.popen.returncode

    def freeze(self) -> None:
        """SIGSTOP: the instance stops in its tracks (a long GC pause, a starved host)."""
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen instance goes on where it stopped, its leases maybe lost."""
        self.popen.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        self.popen.kill()
        self.popen.wait()
        self._log.close()


class ServiceGroup:
    """Several service processes started and stopped together."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_dir: Path,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.overrides = {name: dict(extra) for name, extra in (overrides or {}).items()}
        self.processes: list[ServiceProcess] = []

    def start(self, names: tuple[str, ...] = SERVICES, instances: int = 1) -> None:
        """Start `instances` of each named service."""
        for name in names:
            for index in range(instances):
                self.spawn(name, index)

    def spawn(self, name: str, index: int) -> ServiceProcess:
        """Start one instance of `name` with the group's environment and its overrides."""
        env = {**self.env, **self.overrides.get(name, {})}
        process = ServiceProcess(name, index, env, self.log_dir)
        self.processes.append(process)
        return process

    def dead(self) -> list[ServiceProcess]:
        """Processes that exited on their own."""
        return [p for p in self.processes if not p.alive()]

    def stop(self) -> None:
        """Stop every process (SIGTERM first)."""
        for process in self.processes:
            if process.alive():
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.stop()
