"""JSON-lines logging, configured once by each service's `main.py`.

Modules log through `logging.getLogger(__name__)` and pass call context as
`extra={"contact_id": ..., "track": ..., "shard_id": ...}`; those keys come
out as fields of the JSON line.
"""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_KEYS = ("contact_id", "track", "shard_id", "service", "worker_id", "stream")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and call context."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
