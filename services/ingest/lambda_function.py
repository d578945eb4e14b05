"""The trigger Lambda: a Connect contact flow (or the reference's event) starts a call.

`lambda_handler` validates the event, publishes `CallStarted` to the calls
stream and returns at once (an `inputFileName` event becomes a file-mode call
on `s3://RECORDINGS_BUCKET_NAME/INPUT_KEY_PREFIX<inputFileName>`); the ingest
workers do the reading. A malformed event is answered with the reason and nothing is published.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from callstream.bus.kinesis import KinesisPublisher
from callstream.config import BusSettings, Env
from callstream.errors import InvalidTriggerEvent
from callstream.service import publisher
from services.ingest.trigger import parse_trigger

log = logging.getLogger(__name__)


@cache
def _calls_publisher() -> KinesisPublisher:
    bus = BusSettings.from_env(Env())
    return publisher(bus, bus.calls_stream)


def lambda_handler(event: Any, context: Any = None) -> dict[str, Any]:
    """Publish CallStarted for a valid event; report the error for an invalid one."""
    env = Env()
    try:
        call = parse_trigger(
            event,
            input_bucket=env.text("RECORDINGS_BUCKET_NAME", "") or None,
            input_prefix=env.text("INPUT_KEY_PREFIX", ""),
        )
    except InvalidTriggerEvent as e:
        log.error("refused trigger event: %s", e)
        return {"status": "refused", "reason": str(e)}
    _calls_publisher().publish([call])
    log.info("call accepted", extra={"contact_id": call.contact_id})
    return {"status": "accepted", "contactId": call.contact_id}
