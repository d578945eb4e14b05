"""Persister service: the transcripts stream -> DynamoDB rows (`handler.PersisterHandler`).

Wiring only: settings -> the transcript tables -> handler -> `run_service`.
"""

from __future__ import annotations

from callstream import aws
from callstream import log as logsetup
from callstream.service import load_settings, run_service
from services.persister.adapters import ensure_tables
from services.persister.handler import PersisterHandler
from services.persister.settings import PersisterSettings


def main() -> None:
    """Entry point: `python -m services.persister.main`."""
    logsetup.configure("persister")
    settings = load_settings(PersisterSettings.from_env)
    region = settings.bus.region
    ensure_tables(aws.client("dynamodb", region), [settings.customer_table, settings.agent_table])
    resource = aws.session(region).resource("dynamodb", config=aws.client_config())
    handler = PersisterHandler(settings, resource)
    run_service("persister", settings.bus, settings.bus.transcripts_stream, handler)


if __name__ == "__main__":
    main()
