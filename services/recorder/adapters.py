"""The recorder's S3 edge: whole objects, heads, multipart uploads, tags.

Every object is written with SSE-KMS (`RECORDINGS_KMS_KEY_ID`, else the AWS
managed key `aws/s3`; S3 Bucket Keys on), a full-object CRC32 that S3 checks
(`ChecksumType=FULL_OBJECT` on multipart uploads: S3 verifies the object's
CRC32 we send at completion against the parts it holds), and no ACL unless
`RECORDINGS_PUBLIC_READ_ACL=TRUE` (public-read on the recording, never on a
head).

Errors are classified where they enter (`callstream.awserrors`): SlowDown and
5xx retry, a missing bucket, denied access or a KMS key the recorder may not
use (AccessDenied, KMS.DisabledException, KMS.NotFoundException...) stop the
service, a request S3 refuses as malformed is poison. An upload that no longer
exists (aborted, or completed by another instance) is `UploadGone`, unless
the object it was to become is there whole, with our checksum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlencode

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from callstream.awserrors import classify, error_code
from services.recorder.wav import checksum_b64

log = logging.getLogger(__name__)
T = TypeVar("T")
_GONE = ("NoSuchUpload",)
_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchVersion")


class UploadGone(Exception):
    """A multipart upload or head object we wrote is no longer there."""


class S3Recordings:
    """The recordings bucket, as the recorder uses it."""

    def __init__(
        self, s3: Any, bucket: str, kms_key_id: str | None = None, public_read: bool = False
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.kms_key_id = kms_key_id
        self.public_read = public_read

    def _call(self, what: str, action: Callable[[], T], gone: Iterable[str] = ()) -> T:
        try:
            return action()
        except ClientError as e:
            if error_code(e) in gone:
                raise UploadGone(f"{what}: {error_code(e)}") from e
            raise classify(e, what=f"S3 {what}") from e
        except (BotoCoreError, Boto3Error) as e:
            raise classify(e, what=f"S3 {what}") from e

    def _encryption(self) -> dict[str, Any]:
        args: dict[str, Any] = {"ServerSideEncryption": "aws:kms", "BucketKeyEnabled": True}
        if self.kms_key_id:
            args["SSEKMSKeyId"] = self.kms_key_id
        return args

    def _wav_args(self, metadata: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
        args = {"ContentType": "audio/wav", "Metadata": metadata, "Tagging": urlencode(tags)}
        if self.public_read:
            args["ACL"] = "public-read"
        return {**args, **self._encryption()}

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # --- objects --------------------------------------------------------------------

    def put_wav(
        self, key: str, body: bytes, crc: int, metadata: dict[str, str], tags: dict[str, str]
    ) -> str | None:
        """A whole recording in one request; returns its version id (if versioned)."""
        return self._put(
            f"put of {self._where(key)}", key, body, crc, self._wav_args(metadata, tags)
        )

    def put_head(self, key: str, body: bytes, crc: int) -> str | None:
        """Part 1's PCM, kept until the upload completes; returns its version id."""
        head = {
            "ContentType": "application/octet-stream",
            "Tagging": urlencode({"callstream-incomplete": "true"}),
            **self._encryption(),
        }
        return self._put(f"put of head {self._where(key)}", key, body, crc, head)

    def _put(self, what: str, key: str, body: bytes, crc: int, extra: dict[str, Any]) -> str | None:
        """One PutObject that S3 checks against the body's CRC32; its version id, if any."""
        response = self._call(
            what,
            lambda: self.s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ChecksumAlgorithm="CRC32",
                ChecksumCRC32=checksum_b64(crc),
                **extra,
            ),
        )
        version: str | None = response.get("VersionId")
        return version

    def read_head(self, key: str, version: str | None) -> bytes:
        """The head's bytes (`UploadGone` if it was deleted)."""
        extra = {"VersionId": version} if version else {}
        response = self._call(
            f"get of head {self._where(key)}",
            lambda: self.s3.get_object(Bucket=self.bucket, Key=key, **extra),
            gone=_MISSING,
        )
        body: bytes = response["Body"].read()
        return body

    def delete_head(self, key: str, version: str | None) -> None:
        """Delete the head (that version only, so no copy stays behind in a versioned bucket)."""
        extra = {"VersionId": version} if version else {}
        try:
            self._call(
                f"delete of head {self._where(key)}",
                lambda: self.s3.delete_object(Bucket=self.bucket, Key=key, **extra),
                gone=_MISSING,
            )
        except UploadGone:
            return

    def stored(self, key: str, crc: int, size: int) -> bool:
        """The object is there whole: its size and its full-object CRC32 are ours."""
        try:
            head = self._call(
                f"head of {self._where(key)}",
                lambda: self.s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"),
                gone=_MISSING,
            )
        except UploadGone:
            return False
        return bool(
            head.get("ContentLength") == size and head.get("ChecksumCRC32") == checksum_b64(crc)
        )

    def exists(self, key: str) -> bool:
        """An object is at `key` (a replay that starts mid-call checks this)."""
        try:
            self._call(
                f"head of {self._where(key)}",
                lambda: self.s3.head_object(Bucket=self.bucket, Key=key),
                gone=_MISSING,
            )
        except UploadGone:
            return False
        return True

    def tag(self, key: str, tags: dict[str, str]) -> None:
        """Replace the object's tags."""
        tag_set = [{"Key": k, "Value": v} for k, v in tags.items()]
        self._call(
            f"tagging of {self._where(key)}",
            lambda: self.s3.put_object_tagging(
                Bucket=self.bucket, Key=key, Tagging={"TagSet": tag_set}
            ),
        )

    # --- multipart ------------------------------------------------------------------

    def create_upload(self, key: str, metadata: dict[str, str], tags: dict[str, str]) -> str:
        """Start a multipart upload whose object S3 checks against a full-object CRC32."""
        response = self._call(
            f"multipart upload of {self._where(key)}",
            lambda: self.s3.create_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                ChecksumAlgorithm="CRC32",
                ChecksumType="FULL_OBJECT",
                **self._wav_args(metadata, tags),
            ),
        )
        upload_id: str = response["UploadId"]
        return upload_id

    def upload_part(self, key: str, upload_id: str, number: int, body: bytes, crc: int) -> str:
        """One part (S3 checks its CRC32); returns its ETag."""
        response = self._call(
            f"part {number} of {self._where(key)}",
            lambda: self.s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumCRC32=checksum_b64(crc),
            ),
            gone=_GONE,
        )
        etag: str = response["ETag"]
        return etag

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Iterable[tuple[int, str, int]],
        crc: int,
        size: int,
    ) -> None:
        """Complete the upload; an upload already completed (a retry after the answer was
        lost, another instance) counts if the object is ours, byte count and CRC32."""
        listed = [
            {"PartNumber": n, "ETag": etag, "ChecksumCRC32": checksum_b64(part_crc)}
            for n, etag, part_crc in parts
        ]
        try:
            self._call(
                f"completion of {self._where(key)}",
                lambda: self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": listed},
                    ChecksumCRC32=checksum_b64(crc),
                    ChecksumType="FULL_OBJECT",
                    MpuObjectSize=size,
                ),
                gone=_GONE,
            )
        except UploadGone:
            if not self.stored(key, crc, size):
                raise
            log.info("upload of %s was already complete", self._where(key))

    def abort(self, key: str, upload_id: str) -> None:
        """Abort one upload (gone already: fine)."""
        try:
            self._call(
                f"abort of an upload of {self._where(key)}",
                lambda: self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ),
                gone=_GONE,
            )
        except UploadGone:
            return

    def abort_others(self, key: str, keep: str | None) -> int:
        """Abort every upload of `key` but `keep`: those a crashed attempt left behind."""
        aborted = 0
        for upload_id in self._uploads_of(key):
            if upload_id != keep:
                self.abort(key, upload_id)
                aborted += 1
        return aborted

    def _uploads_of(self, key: str) -> list[str]:
        found: list[str] = []
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": key}
        while True:
            page = self._call(
                f"listing of uploads of {self._where(key)}",
                lambda args=args: self.s3.list_multipart_uploads(**args),  # type: ignore[misc]
            )
            found += [u["UploadId"] for u in page.get("Uploads", []) if u["Key"] == key]
            if not page.get("IsTruncated"):
                return found
            args = {
                **args,
                "KeyMarker": page.get("NextKeyMarker"),
                "UploadIdMarker": page.get("NextUploadIdMarker"),
            }
