"""Shared fixtures: the embedded emulator and an AWS environment bound to it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from callstream_emulator.emulator import Emulator


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    """One Emulator (moto + KVS media endpoint) on free loopback ports per test session."""
    from callstream_emulator.emulator import Emulator

    with Emulator() as running:
        yield running


@pytest.fixture
def aws_env(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The process environment pointed at the emulator; faults are cleared afterwards."""
    from callstream_emulator.emulator import CLEARED_ENV

    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    env = emulator.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    emulator.faults.clear()


@pytest.fixture(scope="session")
def _shared_boto_session(emulator: Emulator) -> Any:
    # A boto3 Session costs ~0.25 s to build; the emulator's env is fixed for
    # the whole run, so one is enough.
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        for name, value in emulator.env().items():
            patch.setenv(name, value)
        return boto3.Session(region_name=emulator.region)


@pytest.fixture
def aws_session(aws_env: dict[str, str], _shared_boto_session: Any) -> Any:
    """A boto3 Session that reaches the emulator through AWS_ENDPOINT_URL."""
    return _shared_boto_session


@pytest.fixture
def trust_local_transcribe(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point an unchanged Transcribe SDK client at a `LocalTranscribeServer` (its env)."""

    def apply(server: Any) -> None:
        for name, value in server.client_env().items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return apply
