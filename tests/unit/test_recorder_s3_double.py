"""An in-memory S3 at the boto3 edge for the recorder's tests, and its contract with moto.

`S3Double` answers the calls the recorder makes (PutObject, GetObject,
HeadObject, DeleteObject, PutObjectTagging, the multipart calls) the way S3
does, errors included: `ClientError`s with S3's codes (NoSuchUpload, InvalidPart,
EntityTooSmall, BadDigest, NoSuchKey), SSE-KMS keys that are missing, disabled
or denied to the caller, the 5 MiB floor on every part but the last, and a
full-object CRC32 checked at completion. The contract tests below run the same
calls against it and against moto (the embedded emulator), so a recorder test
on the double says something about S3.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import pytest
from botocore.exceptions import ClientError

MIB = 1024 * 1024


def _crc(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def client_error(code: str, status: int, operation: str, message: str = "") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message or code},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


@dataclass
class Obj:
    """One stored object (the current version)."""

    body: bytes
    version: str
    metadata: dict[str, str]
    tags: dict[str, str]
    checksum: str
    content_type: str = ""
    sse: str = ""
    kms_key: str = ""
    acl: str = ""
    parts: int = 0


@dataclass
class Upload:
    """One multipart upload in progress."""

    key: str
    args: dict[str, Any]
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)  # n -> (body, etag)


class S3Double:
    """The S3 calls the recorder makes, in memory (one bucket)."""

    def __init__(self, bucket: str = "recordings", min_part: int = 5 * MIB) -> None:
        self.bucket = bucket
        self.min_part = min_part
        self.objects: dict[str, Obj] = {}
        self.uploads: dict[str, Upload] = {}
        self.kms: dict[str, str] = {}  # key id -> "Enabled" | "Disabled" | "Denied"
        self.calls: list[str] = []
        self._ids = itertools.count(1)

    # --- helpers ----------------------------------------------------------------------

    def _bucket(self, bucket: str, operation: str) -> None:
        self.calls.append(operation)
        if bucket != self.bucket:
            raise client_error("NoSuchBucket", 404, operation)

    def _check_kms(self, args: dict[str, Any], operation: str) -> None:
        key = args.get("SSEKMSKeyId")
        if args.get("ServerSideEncryption") != "aws:kms" or not key:
            return  # no key named: the AWS managed key aws/s3, always usable
        state = self.kms.get(key)
        if state is None:
            raise client_error("KMS.NotFoundException", 400, operation, f"Key '{key}' not found")
        if state == "Disabled":
            raise client_error("KMS.DisabledException", 400, operation, f"{key} is disabled.")
        if state == "Denied":
            raise client_error(
                "AccessDenied",
                403,
                operation,
                f"not authorized to perform kms:GenerateDataKey {key}",
            )

    def _new_object(self, key: str, body: bytes, args: dict[str, Any], parts: int = 0) -> Obj:
        obj = Obj(
            body=body,
            version=f"v{next(self._ids)}",
            metadata=dict(args.get("Metadata", {})),
            tags=dict(parse_qsl(args.get("Tagging", ""))),
            checksum=_crc(body),
            content_type=args.get("ContentType", ""),
            sse=args.get("ServerSideEncryption", ""),
            kms_key=args.get("SSEKMSKeyId", ""),
            acl=args.get("ACL", ""),
            parts=parts,
        )
        self.objects[key] = obj
        return obj

    # --- objects ------------------------------------------------------------------

    def put_object(self, Bucket: str, Key: str, Body: bytes, **args: Any) -> dict[str, Any]:
        self._bucket(Bucket, "PutObject")
        self._check_kms(args, "PutObject")
        body = bytes(Body)
        given = args.get("ChecksumCRC32")
        if given is not None and given != _crc(body):
            raise client_error("BadDigest", 400, "PutObject")
        obj = self._new_object(Key, body, args)
        return {"ETag": f'"{obj.checksum}"', "VersionId": obj.version}

    def _get(self, key: str, version: str | None, operation: str) -> Obj:
        obj = self.objects.get(key)
        if obj is None or (version is not None and obj.version != version):
            code = "NoSuchKey" if operation == "GetObject" else "404"
            raise client_error(code, 404, operation)
        return obj

    def get_object(self, Bucket: str, Key: str, VersionId: str | None = None) -> dict[str, Any]:
        self._bucket(Bucket, "GetObject")
        obj = self._get(Key, VersionId, "GetObject")
        self._check_kms({"ServerSideEncryption": obj.sse, "SSEKMSKeyId": obj.kms_key}, "GetObject")
        return {"Body": io.BytesIO(obj.body), "ContentLength": len(obj.body)}

    def head_object(self, Bucket: str, Key: str, ChecksumMode: str = "") -> dict[str, Any]:
        self._bucket(Bucket, "HeadObject")
        obj = self._get(Key, None, "HeadObject")
        head: dict[str, Any] = {
            "ContentLength": len(obj.body),
            "ContentType": obj.content_type,
            "Metadata": obj.metadata,
            "ServerSideEncryption": obj.sse,
            "VersionId": obj.version,
        }
        if obj.kms_key:
            head["SSEKMSKeyId"] = obj.kms_key
        if ChecksumMode == "ENABLED":
            head["ChecksumCRC32"] = obj.checksum
        return head

    def delete_object(self, Bucket: str, Key: str, VersionId: str | None = None) -> dict[str, Any]:
        self._bucket(Bucket, "DeleteObject")
        obj = self.objects.get(Key)
        if obj is not None and (VersionId is None or obj.version == VersionId):
            del self.objects[Key]
        return {}

    def put_object_tagging(self, Bucket: str, Key: str, Tagging: dict[str, Any]) -> dict[str, Any]:
        self._bucket(Bucket, "PutObjectTagging")
        obj = self._get(Key, None, "PutObjectTagging")
        obj.tags = {t["Key"]: t["Value"] for t in Tagging["TagSet"]}
        return {}

    def get_object_tagging(self, Bucket: str, Key: str) -> dict[str, Any]:
        self._bucket(Bucket, "GetObjectTagging")
        obj = self._get(Key, None, "GetObjectTagging")
        return {"TagSet": [{"Key": k, "Value": v} for k, v in obj.tags.items()]}

    # --- multipart ------------------------------------------------------------------

    def create_multipart_upload(self, Bucket: str, Key: str, **args: Any) -> dict[str, Any]:
        self._bucket(Bucket, "CreateMultipartUpload")
        self._check_kms(args, "CreateMultipartUpload")
        upload_id = uuid.uuid4().hex
        self.uploads[upload_id] = Upload(Key, args)
        return {"UploadId": upload_id, "Key": Key}

    def _upload(self, upload_id: str, operation: str) -> Upload:
        upload = self.uploads.get(upload_id)
        if upload is None:
            raise client_error("NoSuchUpload", 404, operation)
        return upload

    def upload_part(
        self,
        Bucket: str,
        Key: str,
        UploadId: str,
        PartNumber: int,
        Body: bytes,
        ChecksumCRC32: str | None = None,
    ) -> dict[str, Any]:
        self._bucket(Bucket, "UploadPart")
        upload = self._upload(UploadId, "UploadPart")
        self._check_kms(upload.args, "UploadPart")
        body = bytes(Body)
        if ChecksumCRC32 is not None and ChecksumCRC32 != _crc(body):
            raise client_error("BadDigest", 400, "UploadPart")
        etag = f'"{zlib.adler32(body):08x}{len(body):x}"'
        upload.parts[PartNumber] = (body, etag)
        return {"ETag": etag, "ChecksumCRC32": _crc(body)}

    def complete_multipart_upload(
        self,
        Bucket: str,
        Key: str,
        UploadId: str,
        MultipartUpload: dict[str, Any],
        ChecksumCRC32: str | None = None,
        ChecksumType: str | None = None,
        MpuObjectSize: int | None = None,
    ) -> dict[str, Any]:
        self._bucket(Bucket, "CompleteMultipartUpload")
        upload = self._upload(UploadId, "CompleteMultipartUpload")
        listed = MultipartUpload["Parts"]
        if [p["PartNumber"] for p in listed] != sorted({p["PartNumber"] for p in listed}):
            raise client_error("InvalidPartOrder", 400, "CompleteMultipartUpload")
        bodies = []
        for i, part in enumerate(listed):
            held = upload.parts.get(part["PartNumber"])
            if held is None or held[1] != part["ETag"]:
                raise client_error("InvalidPart", 400, "CompleteMultipartUpload")
            if i < len(listed) - 1 and len(held[0]) < self.min_part:
                raise client_error("EntityTooSmall", 400, "CompleteMultipartUpload")
            bodies.append(held[0])
        body = b"".join(bodies)
        if ChecksumCRC32 is not None and ChecksumCRC32 != _crc(body):
            raise client_error("BadDigest", 400, "CompleteMultipartUpload")
        if MpuObjectSize is not None and MpuObjectSize != len(body):
            raise client_error("InvalidRequest", 400, "CompleteMultipartUpload")
        del self.uploads[UploadId]
        obj = self._new_object(Key, body, upload.args, parts=len(listed))
        return {"ETag": f'"{obj.checksum}-{len(listed)}"', "ChecksumCRC32": obj.checksum}

    def abort_multipart_upload(self, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]:
        self._bucket(Bucket, "AbortMultipartUpload")
        self._upload(UploadId, "AbortMultipartUpload")
        del self.uploads[UploadId]
        return {}

    def list_multipart_uploads(self, Bucket: str, Prefix: str = "", **_: Any) -> dict[str, Any]:
        self._bucket(Bucket, "ListMultipartUploads")
        found = [
            {"Key": u.key, "UploadId": upload_id}
            for upload_id, u in self.uploads.items()
            if u.key.startswith(Prefix)
        ]
        return {"Uploads": found, "IsTruncated": False}


# --- the contract: the double answers as moto does ------------------------------------


@pytest.fixture(params=["double", "moto"])
def s3(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "double":
        yield S3Double("contract-bucket")
        return
    from callstream_emulator import s3_recordings

    session = request.getfixturevalue("aws_session")
    patches = s3_recordings.apply()  # NoSuchUpload and KMS keys as S3 answers them
    client = session.client("s3")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket="contract-bucket")
    yield client
    patches.revert()


def _code(error: ClientError) -> str:
    return str(error.response["Error"]["Code"])


def test_a_multipart_upload_with_part_one_last_gives_the_parts_in_number_order(s3: Any) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first, second, last = b"\x01" * (5 * MIB), b"\x02" * (5 * MIB), b"\x03" * 1000
    upload = s3.create_multipart_upload(
        Bucket="contract-bucket",
        Key=key,
        ContentType="audio/wav",
        Metadata={"contact-id": "c"},
        Tagging="contact-id=c",
        ChecksumAlgorithm="CRC32",
        ChecksumType="FULL_OBJECT",
        ServerSideEncryption="aws:kms",
    )["UploadId"]
    parts = {}
    for number, body in ((2, second), (3, last), (1, first)):
        answer = s3.upload_part(
            Bucket="contract-bucket",
            Key=key,
            UploadId=upload,
            PartNumber=number,
            Body=body,
            ChecksumCRC32=_crc(body),
        )
        parts[number] = {"PartNumber": number, "ETag": answer["ETag"], "ChecksumCRC32": _crc(body)}
    whole = first + second + last
    s3.complete_multipart_upload(
        Bucket="contract-bucket",
        Key=key,
        UploadId=upload,
        MultipartUpload={"Parts": [parts[n] for n in (1, 2, 3)]},
        ChecksumCRC32=_crc(whole),
        ChecksumType="FULL_OBJECT",
        MpuObjectSize=len(whole),
    )
    assert s3.get_object(Bucket="contract-bucket", Key=key)["Body"].read() == whole
    head = s3.head_object(Bucket="contract-bucket", Key=key, ChecksumMode="ENABLED")
    assert head["ContentLength"] == len(whole) and head["ChecksumCRC32"] == _crc(whole)
    assert head["Metadata"] == {"contact-id": "c"} and head["ServerSideEncryption"] == "aws:kms"
    tags = s3.get_object_tagging(Bucket="contract-bucket", Key=key)["TagSet"]
    assert tags == [{"Key": "contact-id", "Value": "c"}]
    with pytest.raises(ClientError) as e:
        s3.upload_part(
            Bucket="contract-bucket", Key=key, UploadId="no-such-upload", PartNumber=1, Body=b"x"
        )
    assert _code(e.value) == "NoSuchUpload"


def test_a_part_under_5_mib_that_is_not_the_last_is_refused_at_completion(s3: Any) -> None:
    key = f"k-{uuid.uuid4().hex}"
    upload = s3.create_multipart_upload(Bucket="contract-bucket", Key=key)["UploadId"]
    listed = []
    for number, body in ((1, b"a" * 1000), (2, b"b" * 1000)):
        etag = s3.upload_part(
            Bucket="contract-bucket", Key=key, UploadId=upload, PartNumber=number, Body=body
        )["ETag"]
        listed.append({"PartNumber": number, "ETag": etag})
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(
            Bucket="contract-bucket", Key=key, UploadId=upload, MultipartUpload={"Parts": listed}
        )
    assert _code(e.value) == "EntityTooSmall"


def test_an_aborted_upload_is_gone_and_no_longer_listed(s3: Any) -> None:
    key = f"k-{uuid.uuid4().hex}"
    keep = s3.create_multipart_upload(Bucket="contract-bucket", Key=key)["UploadId"]
    other = s3.create_multipart_upload(Bucket="contract-bucket", Key=key)["UploadId"]
    listed = s3.list_multipart_uploads(Bucket="contract-bucket", Prefix=key)["Uploads"]
    assert {u["UploadId"] for u in listed} == {keep, other}
    s3.abort_multipart_upload(Bucket="contract-bucket", Key=key, UploadId=other)
    listed = s3.list_multipart_uploads(Bucket="contract-bucket", Prefix=key)["Uploads"]
    assert [u["UploadId"] for u in listed] == [keep]
    with pytest.raises(ClientError) as e:
        s3.abort_multipart_upload(Bucket="contract-bucket", Key=key, UploadId=other)
    assert _code(e.value) == "NoSuchUpload"
    s3.abort_multipart_upload(Bucket="contract-bucket", Key=key, UploadId=keep)


def test_a_missing_object_is_no_such_key_and_a_put_is_read_back_whole(s3: Any) -> None:
    key = f"k-{uuid.uuid4().hex}"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="contract-bucket", Key=key)
    assert _code(e.value) == "NoSuchKey"
    s3.put_object(
        Bucket="contract-bucket",
        Key=key,
        Body=b"RIFF....",
        ChecksumCRC32=_crc(b"RIFF...."),
        Tagging="a=1&b=two",
        ChecksumAlgorithm="CRC32",
    )
    assert s3.get_object(Bucket="contract-bucket", Key=key)["Body"].read() == b"RIFF...."
    head = s3.head_object(Bucket="contract-bucket", Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == _crc(b"RIFF....")
    tags = s3.get_object_tagging(Bucket="contract-bucket", Key=key)["TagSet"]
    assert sorted((t["Key"], t["Value"]) for t in tags) == [("a", "1"), ("b", "two")]
    s3.delete_object(Bucket="contract-bucket", Key=key)
    with pytest.raises(ClientError):
        s3.head_object(Bucket="contract-bucket", Key=key)


def test_a_kms_key_that_is_missing_disabled_or_denied_is_refused_as_s3_refuses_it(
    s3: Any, request: pytest.FixtureRequest
) -> None:
    if isinstance(s3, S3Double):
        s3.kms.update({"k-off": "Disabled", "k-denied": "Denied"})
        disabled, denied, missing = "k-off", "k-denied", "k-missing"
    else:
        kms = request.getfixturevalue("aws_session").client("kms")
        disabled = kms.create_key()["KeyMetadata"]["KeyId"]
        kms.disable_key(KeyId=disabled)
        deny = {"Effect": "Deny", "Principal": {"AWS": "*"}, "Action": "kms:GenerateDataKey"}
        allow = {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:*"}
        policy = {
            "Version": "2012-10-17",
            "Statement": [{**allow, "Resource": "*"}, {**deny, "Resource": "*"}],
        }
        denied = kms.create_key(Policy=json.dumps(policy))["KeyMetadata"]["KeyId"]
        missing = "1234abcd-12ab-34cd-56ef-1234567890ab"
    for key_id, code, status in (
        (disabled, "KMS.DisabledException", 400),
        (denied, "AccessDenied", 403),
        (missing, "KMS.NotFoundException", 400),
    ):
        for call in (
            lambda k=key_id: s3.put_object(
                Bucket="contract-bucket",
                Key="x",
                Body=b"1",
                ServerSideEncryption="aws:kms",
                SSEKMSKeyId=k,
            ),
            lambda k=key_id: s3.create_multipart_upload(
                Bucket="contract-bucket", Key="x", ServerSideEncryption="aws:kms", SSEKMSKeyId=k
            ),
        ):
            with pytest.raises(ClientError) as e:
                call()
            assert (_code(e.value), e.value.response["ResponseMetadata"]["HTTPStatusCode"]) == (
                code,
                status,
            )
