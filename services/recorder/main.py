"""Recorder service: the audio stream -> one WAV per track in S3.

Thin wiring over `core.CallRecording` (what to write) and `spool.Spool`
(where it waits). A call is settled once its WAVs are in S3.

Several instances may run at once: each spools under its own worker id, so
two instances that both see a call (a takeover, a stolen lease) never write
into or delete each other's files. A replay that starts mid-call (after a
takeover, of a call already settled) ends without all its chunks; if its
WAVs are in S3, the call is recognised as done and skipped.

S3 errors are classified where they enter (`callstream.awserrors`): SlowDown
and 5xx retry, a missing bucket or denied access stops the service, an
object S3 refuses dead-letters the record that completed the call.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from callstream import aws
from callstream import log as logsetup
from callstream.awserrors import classify
from callstream.bus.ports import Record
from callstream.config import RecorderSettings
from callstream.events import CallEnded, Event
from callstream.service import load_settings, run_service
from services.recorder.core import CallRecording, UploadWav
from services.recorder.spool import Spool

log = logging.getLogger(__name__)
_DONE_MEMORY = 10_000


class RecorderHandler:
    """Feeds each call's recording and applies its effects."""

    def __init__(self, settings: RecorderSettings, s3: Any) -> None:
        self.settings = settings
        self.s3 = s3
        worker = re.sub(r"[^A-Za-z0-9_.-]", "_", settings.bus.worker_id)
        self.spool = Spool(Path(settings.spool_dir) / worker)
        self.calls: dict[str, CallRecording] = {}
        self.done: OrderedDict[str, None] = OrderedDict()

    def handle(self, event: Event, record: Record) -> None:
        contact_id = getattr(event, "contact_id", None)
        if contact_id is None or contact_id in self.done:
            return
        call = self.calls.get(contact_id)
        if call is None:
            call = self.calls[contact_id] = CallRecording(contact_id, self.settings.key_prefix)
        for write in call.accept(event):
            self.spool.write(write.contact_id, write.track, write.byte_offset, write.pcm)
        if isinstance(event, CallEnded) and not call.complete:
            log.info(
                "call ended with chunks still missing: have %s of %s",
                {t.value: len(p.sequences) for t, p in call.tracks.items()},
                event.chunk_counts,
                extra={"contact_id": contact_id},
            )
        if isinstance(event, CallEnded) and not call.complete and self._already_stored(call):
            log.info("replayed call already recorded; skipped", extra={"contact_id": contact_id})
            self._retire(contact_id)
            return
        uploads = call.uploads()
        if uploads:
            for upload in uploads:
                self._upload(upload)
            call.mark_uploaded()
            self._retire(contact_id)

    def is_settled(self, contact_id: str) -> bool:
        return contact_id in self.done

    def tick(self) -> None:
        return None

    def forget(self, contact_ids: Iterable[str]) -> None:
        for contact_id in contact_ids:
            self.calls.pop(contact_id, None)

    def _already_stored(self, call: CallRecording) -> bool:
        keys = call.stored_keys()
        return bool(keys) and all(self._exists(key) for key in keys)

    def _exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.settings.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise classify(e, what=f"S3 head of s3://{self.settings.bucket}/{key}") from e
        except BotoCoreError as e:
            raise classify(e, what=f"S3 head of s3://{self.settings.bucket}/{key}") from e
        return True

    def _upload(self, upload: UploadWav) -> None:
        path = self.spool.finish(upload.contact_id, upload.track, upload.pcm_bytes)
        extra: dict[str, Any] = {
            "ContentType": "audio/wav",
            "Metadata": {"contact-id": upload.contact_id, "track": upload.track.value},
        }
        if self.settings.public_read:
            extra["ACL"] = "public-read"
        try:
            self.s3.upload_file(str(path), self.settings.bucket, upload.key, ExtraArgs=extra)
        except (ClientError, BotoCoreError, Boto3Error) as e:  # upload_file wraps ClientErrors
            raise classify(e, what=f"S3 upload to s3://{self.settings.bucket}/{upload.key}") from e
        log.info(
            "stored s3://%s/%s (%d bytes of PCM)",
            self.settings.bucket,
            upload.key,
            upload.pcm_bytes,
            extra={"contact_id": upload.contact_id, "track": upload.track.value},
        )

    def _retire(self, contact_id: str) -> None:
        self.calls.pop(contact_id, None)
        self.spool.discard(contact_id)
        self.done[contact_id] = None
        while len(self.done) > _DONE_MEMORY:
            self.done.popitem(last=False)


def main() -> None:
    """Entry point: `python -m services.recorder.main`."""
    logsetup.configure("recorder")
    settings = load_settings(RecorderSettings.from_env)
    s3 = aws.client("s3", settings.bus.region)
    run_service("recorder", settings.bus, settings.bus.audio_stream, RecorderHandler(settings, s3))


if __name__ == "__main__":
    main()
