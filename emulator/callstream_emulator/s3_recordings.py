"""Emulator patches for what the recorder meets in S3 and moto does not model.

- SSE-KMS keys are checked the way S3 checks them when it writes an object:
  a key moto's KMS does not know is `KMS.NotFoundException`, a disabled (or
  pending deletion) key `KMS.DisabledException`, a key whose policy denies
  `kms:GenerateDataKey` (`Effect: Deny`, any principal) `AccessDenied` (403),
  as a key policy or grant that leaves the recorder out does. moto stores
  whatever key id it is given.
- UploadPart to an upload that does not exist (aborted, completed) is
  `NoSuchUpload` (404), as in S3; moto fails with an internal error.

`apply()` patches the moto classes of this process (the embedded emulator
runs moto in-process) and returns a handle whose `revert()` undoes it. The
recorder's tests apply it around the emulator; `Emulator.start` can too.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from collections.abc import Callable
from typing import Any

from moto.kms.models import kms_backends
from moto.s3.exceptions import NoSuchUpload, S3ClientError
from moto.s3.models import S3Backend

_lock = threading.Lock()


class KmsKeyError(S3ClientError):
    """What S3 answers when it cannot use the object's KMS key."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(code, message)
        self.code = code
        self.code_status = status


class AccessDenied(KmsKeyError):
    """The key's policy leaves the caller out."""

    code = "AccessDenied"

    def __init__(self, message: str) -> None:
        super().__init__("AccessDenied", message, 403)


class Patches:
    """Replaced attributes, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Callable[..., Any]) -> None:
        self._undo.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, value)

    def revert(self) -> None:
        """Undo every replacement."""
        while self._undo:
            owner, name, original = self._undo.pop()
            setattr(owner, name, original)


def apply() -> Patches:
    """Patch moto's S3 backend (see the module docstring)."""
    patches = Patches()
    with _lock:
        _patch(patches, "put_object", "encryption")
        _patch(patches, "create_multipart_upload", "sse_encryption")
        _patch_upload_part(patches)
    return patches


def _patch(patches: Patches, name: str, encryption_arg: str) -> None:
    """Check the KMS key of calls to `S3Backend.<name>` (moto passes it by keyword or not)."""
    original = S3Backend.__dict__[name]
    signature = inspect.signature(original)

    @functools.wraps(original)
    def checked(self: S3Backend, *args: Any, **kwargs: Any) -> Any:
        given = signature.bind(self, *args, **kwargs).arguments
        _check_key(self.account_id, given.get(encryption_arg), given.get("kms_key_id"))
        return original(self, *args, **kwargs)

    patches.replace(S3Backend, name, checked)


def _patch_upload_part(patches: Patches) -> None:
    original = S3Backend.__dict__["upload_part"]

    @functools.wraps(original)
    def upload_part(
        self: S3Backend, bucket_name: str, multipart_id: str, part_id: int, value: bytes
    ) -> Any:
        multipart = self.get_bucket(bucket_name).multiparts.get(multipart_id)
        if multipart is None:
            raise NoSuchUpload(upload_id=multipart_id)
        _check_key(self.account_id, multipart.sse_encryption, multipart.kms_key_id)
        return original(self, bucket_name, multipart_id, part_id, value)

    patches.replace(S3Backend, "upload_part", upload_part)


def _check_key(account_id: str, encryption: str | None, key_id: str | None) -> None:
    """Raise what S3 answers for a KMS key it may not use; no key named: aws/s3, usable."""
    if encryption != "aws:kms" or not key_id:
        return
    key = _find_key(account_id, key_id)
    if key is None:
        raise KmsKeyError("KMS.NotFoundException", f"Invalid keyId '{key_id}'", 400)
    if key.key_state != "Enabled":
        raise KmsKeyError("KMS.DisabledException", f"{key.arn} is {key.key_state.lower()}.", 400)
    if _denies_generate_data_key(key.policy):
        raise AccessDenied(
            f"User is not authorized to perform: kms:GenerateDataKey on resource: {key.arn} "
            "because no identity-based or key policy allows it"
        )


def _find_key(account_id: str, key_id: str) -> Any | None:
    regions = [key_id.split(":")[3]] if key_id.startswith("arn:") else None
    for region, backend in kms_backends[account_id].items():
        if regions is not None and region not in regions:
            continue
        try:
            return backend.describe_key(key_id)
        except Exception:  # moto raises KeyError or NotFoundException for unknown ids
            continue
    return None


def _denies_generate_data_key(policy: str) -> bool:
    try:
        statements = json.loads(policy).get("Statement", [])
    except (TypeError, ValueError):
        return False
    for statement in statements if isinstance(statements, list) else [statements]:
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        if statement.get("Effect") == "Deny" and any(
            a in ("kms:*", "kms:GenerateDataKey", "kms:GenerateDataKey*") for a in actions
        ):
            return True
    return False
