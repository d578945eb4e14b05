"""Running one call under its ownership: claim, find where it stands, resume or wait.

`Takeover.run(call, make_session)` is what a pool thread does per CallStarted:

1. claim the call in the progress table; a live other owner keeps it:
   `WAITING` (the handler tries again later; the call stays unsettled);
2. saved progress says `ended`: nothing to do (`ENDED`, no KVS read);
3. the previous owner left without releasing (it died, or lost the call
   mid-way): it may have published after its last save, so this contact's
   events are read back from the audio stream from a bit before that save,
   and the state is advanced past them (`core.advance`: chunks stored past a
   hole in the dead owner's last batch are kept in the state and not
   published again); a CallEnded there means the call is done. The
   advanced state is saved at once, so a later release never hides that
   window from the next owner; if that save fails, the run fails and the
   call is run again (read back again);
4. run the session, restored from the state (no second CallStarted).

The previous owner may be this instance: a run that failed (a publish or
its last save not taken, see `session.py`) leaves the call held and
unreleased, and its next run from `tick` reads back the same way.

Errors out of a run (a `RetryableError`: run again later; a
`ConfigurationFault` of the progress store or the audio stream: the
service must stop) are the handler's to act on.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from callstream.events import CallStarted
from callstream.progress import OwnedProgressStore
from services.ingest.core import advance
from services.ingest.ownership import CallOwnership, Heartbeats, OwnershipLost
from services.ingest.published import PublishedEvents
from services.ingest.session import CallSession, SessionStopped

log = logging.getLogger(__name__)

# How far before the last save to read the audio stream back: covers clock
# skew between this host and Kinesis's arrival timestamps.
WINDOW_MARGIN_MS = 5_000


class Outcome(enum.Enum):
    """How a call's run on this instance ended."""

    ENDED = "ended"  # its CallEnded is on the audio stream (now or earlier)
    WAITING = "waiting"  # another live instance holds it: try again later
    STOPPED = "stopped"  # told to stop (calls shard lost): saved and released
    LOST = "lost"  # taken by another instance mid-way: stopped at once


SessionFactory = Callable[[dict[str, Any] | None, CallOwnership], CallSession]


@dataclass
class Takeover:
    """What every call's run shares: the progress store, this worker, the audio read-back."""

    store: OwnedProgressStore
    worker_id: str
    lease_ms: int
    published: PublishedEvents | None
    heartbeats: Heartbeats
    margin_ms: int = WINDOW_MARGIN_MS

    def run(self, call: CallStarted, make_session: SessionFactory) -> Outcome:
        """Claim the call and run it from where it stands."""
        extra = {"contact_id": call.contact_id}
        ownership = CallOwnership(self.store, call.contact_id, self.worker_id, self.lease_ms)
        claim = ownership.claim()
        state = claim.state
        if state is not None and state.get("ended"):
            if claim.granted:
                ownership.release()
            return Outcome.ENDED
        if not claim.granted:
            log.info("call held by %s; waiting", claim.holder, extra=extra)
            return Outcome.WAITING
        self.heartbeats.add(ownership)
        try:
            if claim.unreleased and not call.stream_arn.startswith("s3://"):
                state = self._after_unsaved(call.contact_id, state, claim.saved_at_ms, ownership)
                if state.get("ended"):
                    ownership.release()
                    return Outcome.ENDED
            if state is not None:
                after = state.get("last_completed_fragment")
                log.info("resuming after fragment %s", after, extra=extra)
            make_session(state, ownership).run()
            return Outcome.ENDED
        except SessionStopped:
            return Outcome.STOPPED
        except OwnershipLost as e:
            log.error("stopped: %s", e, extra=extra)
            return Outcome.LOST
        finally:
            self.heartbeats.remove(ownership)

    def _after_unsaved(
        self,
        contact_id: str,
        state: dict[str, Any] | None,
        saved_at_ms: int,
        ownership: CallOwnership,
    ) -> dict[str, Any]:
        """The state advanced past what the previous owner published after saving it."""
        began = time.monotonic()
        found = (
            []
            if self.published is None
            else self.published.since(contact_id, saved_at_ms - self.margin_ms)
        )
        advanced = advance(state, contact_id, found)
        ownership.save(advanced, required=True)
        log.info(
            "previous owner left without releasing: read back %d events in %.2f s",
            len(found),
            time.monotonic() - began,
            extra={"contact_id": contact_id},
        )
        return advanced
