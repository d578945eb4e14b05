"""This instance's hold on the calls it ingests: claim, save, heartbeat, release.

One `CallOwnership` per running call binds the progress store to the call
and this worker. Every save carries the next version and is conditional on
still owning the call; a save or heartbeat that finds the call taken marks
the ownership lost, and the session stops at once. `Heartbeats` renews every
held call on its own thread every lease/3, so a call whose session is blocked
(a long read, a throttled publish) is never taken from a live instance.

Before each publish the session calls `confirm()`: if no ownership write has
succeeded for two thirds of the lease (DynamoDB throttled or unreachable, the
process frozen), it renews first, retrying until a whole lease has passed
since the last success, and stops if it cannot. A new owner only claims a
call whose heartbeat is a whole lease old, so a publish never starts after
another instance may have taken the call (clocks in sync, as for leases).

Errors of the progress store, as `callstream.awserrors` sorts them:

- retryable (throttling, timeouts): a save that fails may still have been
  stored (its answer lost), so the next save takes the version after it
  either way; the progress is then `unsaved` until a save succeeds, and an
  unsaved call is not released: it expires, and its next owner reads back
  what was published since the last save instead of trusting the stale
  state. A save the caller cannot do without (`required`: the last one of a
  call) raises instead, and the call is run again. A failed heartbeat or
  release waits for the next one, or for the lease to run out;
- poison (the state refused, over DynamoDB's 400 KB): retrying cannot mend
  it, and the audio matters more than the progress: logged, the call goes
  on unsaved (never released, so a takeover reads back);
- configuration (the table missing, access denied): raised from save,
  release and confirm (a heartbeat's is kept and raised by the session's
  next `confirm`), so the call stops at once with nothing more published
  and the fault reaches the service, which must stop loudly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from callstream.errors import ConfigurationFault, PoisonRecordError, RetryableError
from callstream.progress import Claim, OwnedProgressStore

log = logging.getLogger(__name__)


class OwnershipLost(Exception):
    """The call is no longer ours (or ownership cannot be confirmed): stop at once."""


class CallOwnership:
    """One call held by this worker in the progress table."""

    def __init__(
        self,
        store: OwnedProgressStore,
        contact_id: str,
        worker_id: str,
        lease_ms: int,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.contact_id = contact_id
        self.worker_id = worker_id
        self.lease_s = lease_ms / 1000
        self.monotonic = monotonic
        self.sleep = sleep
        self.version = 0
        self.writes = 0
        self.lost = False
        self.unsaved = False  # a save failed and none succeeded since: do not release
        self.fault: ConfigurationFault | None = None  # a heartbeat's, raised by `confirm`
        self._confirmed_at = -1e18
        self._lock = threading.Lock()
        self.extra = {"contact_id": contact_id}

    def claim(self) -> Claim:
        """Try to take the call; on success the next save follows the stored version."""
        began = self.monotonic()
        claim = self.store.claim(self.contact_id, self.worker_id, int(self.lease_s * 1000))
        if claim.granted:
            self.version = claim.version
            self._confirmed(began)
        return claim

    def save(self, state: dict[str, Any], *, required: bool = False) -> None:
        """Store `state` as the next version; raises OwnershipLost if the call was taken.

        A retryable failure is logged and left to the next save, or raised if
        `required`; either way the version moves on (the write may have been
        stored) and the progress counts as unsaved until a save succeeds."""
        with self._lock:
            self._check()
            began = self.monotonic()
            version = self.version + 1
            try:
                stored = self.store.save_owned(self.contact_id, self.worker_id, state, version)
            except RetryableError as e:
                self.version, self.unsaved = version, True
                if required:
                    raise
                log.warning("progress not saved: %s", e, extra=self.extra)
                return
            except PoisonRecordError as e:  # never storable: go on unsaved (see module doc)
                self.version, self.unsaved = version, True
                log.error("progress refused, the call goes on unsaved: %s", e, extra=self.extra)
                return
            if not stored:
                self._lose("save refused")
            self.version, self.unsaved = version, False
            self._confirmed(began)

    def heartbeat(self) -> bool:
        """Renew ownership; False once it is lost (a failed request just waits for the next).

        Raises ConfigurationFault, and keeps it for `confirm`."""
        with self._lock:
            if self.lost:
                return False
            began = self.monotonic()
            try:
                if not self.store.heartbeat(self.contact_id, self.worker_id):
                    self._lose("heartbeat refused", raise_=False)
                    return False
            except (RetryableError, PoisonRecordError) as e:
                log.warning("ownership heartbeat failed: %s", e, extra=self.extra)
                return True
            except ConfigurationFault as e:
                self.fault = e
                raise
            self._confirmed(began)
            return True

    def due(self) -> bool:
        """No ownership write has succeeded for a third of the lease."""
        return self.monotonic() - self._confirmed_at >= self.lease_s / 3

    def confirm(self) -> None:
        """Before a publish: make sure the call is still ours, or raise OwnershipLost
        (ConfigurationFault if the progress store cannot be used at all)."""
        self._check()
        if self.monotonic() - self._confirmed_at < self.lease_s * 2 / 3:
            return
        # Throttled or slow writes: keep trying while no one else can have claimed the call.
        while self.monotonic() - self._confirmed_at < self.lease_s:
            if not self.heartbeat():
                break  # refused: taken
            if self.monotonic() - self._confirmed_at < self.lease_s * 2 / 3:
                return
            self.sleep(min(0.2, self.lease_s / 20))
        raise OwnershipLost(f"ownership of {self.contact_id} not confirmed within a lease")

    def release(self) -> None:
        """Give the call up after its last save (a failure leaves it to expire).

        Not while the progress is unsaved: released, the call would be resumed
        from the stale state without reading back what was published since."""
        with self._lock:
            if self.lost:
                return
            self.lost = True  # nothing more is done under it
            if self.unsaved:
                log.warning(
                    "ownership not released: progress since the last save is not stored; "
                    "the next owner reads it back once the lease expires",
                    extra=self.extra,
                )
                return
            try:
                self.store.release(self.contact_id, self.worker_id)
                self.writes += 1
            except (RetryableError, PoisonRecordError) as e:
                log.warning("ownership not released (it expires): %s", e, extra=self.extra)

    def _check(self) -> None:
        """Raise if nothing more may be done under this ownership."""
        if self.fault is not None:
            raise ConfigurationFault(f"progress of {self.contact_id}: {self.fault}") from self.fault
        if self.lost:
            raise OwnershipLost(f"call {self.contact_id} is no longer ours")

    def _confirmed(self, began: float) -> None:
        self.writes += 1
        self._confirmed_at = began  # the lease counts from before the write

    def _lose(self, why: str, raise_: bool = True) -> None:
        self.lost = True
        log.error("call taken by another instance (%s); stopping", why, extra=self.extra)
        if raise_:
            raise OwnershipLost(f"call {self.contact_id}: {why}")


class Heartbeats:
    """Renews every held call on one daemon thread, each at least every lease/3."""

    def __init__(self, lease_ms: int) -> None:
        self.period_s = lease_ms / 6000
        self._held: dict[str, CallOwnership] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, ownership: CallOwnership) -> None:
        with self._lock:
            self._held[ownership.contact_id] = ownership
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ingest-heartbeats", daemon=True
                )
                self._thread.start()

    def remove(self, ownership: CallOwnership) -> None:
        with self._lock:
            if self._held.get(ownership.contact_id) is ownership:
                del self._held[ownership.contact_id]

    def beat(self) -> None:
        """One round: renew the calls that are due."""
        with self._lock:
            held = list(self._held.values())
        for ownership in held:
            try:
                renewed = not ownership.due() or ownership.heartbeat()
            except ConfigurationFault as e:  # kept: the session raises it at its next publish
                log.critical("ownership heartbeat: %s", e, extra=ownership.extra)
                renewed = False
            if not renewed:
                self.remove(ownership)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.beat()
            except Exception:  # a bad round must not end the heartbeats of every call
                log.exception("ownership heartbeats failed; next round in %.1f s", self.period_s)
