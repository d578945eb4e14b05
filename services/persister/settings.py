"""The persister's settings: DynamoDB tables and what goes in them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from callstream.config import BusSettings, Env


@dataclass(frozen=True)
class PersisterSettings:
    """The persister service: DynamoDB tables and what goes in them."""

    bus: BusSettings
    customer_table: str
    agent_table: str
    save_partials: bool
    console_log: bool
    ttl_days: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PersisterSettings:
        """Validate the persister's environment."""
        env = Env(environ)
        return cls(
            bus=BusSettings.from_env(env),
            customer_table=env.name("TABLE_CALLER_TRANSCRIPT", "contactTranscriptSegments"),
            agent_table=env.name(
                "TABLE_CALLER_TRANSCRIPT_TO_CUSTOMER", "contactTranscriptSegmentsToCustomer"
            ),
            save_partials=env.flag("SAVE_PARTIAL_TRANSCRIPTS", False),
            console_log=env.flag("CONSOLE_LOG_TRANSCRIPT_FLAG", False),
            ttl_days=env.integer("CALLSTREAM_TRANSCRIPT_TTL_DAYS", 7, minimum=1),
        )
