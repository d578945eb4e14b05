"""Time as the runtime reads and waits on it: wall-clock milliseconds, backoff delays.

Used by the runtime loop, the bus (leases, consumer, dead letters) and the
services' handlers that retry a write.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator


def now_ms() -> int:
    """Wall-clock epoch milliseconds."""
    return int(time.time() * 1000)


def backoff_delays(base_s: float = 0.05, cap_s: float = 2.0) -> Iterator[float]:
    """Full-jitter exponential backoff delays (seconds), forever."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap_s, base_s * (2**attempt)))
        attempt += 1
