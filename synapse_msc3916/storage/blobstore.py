"""Content-addressed blob stores: a directory, or an S3 bucket.

Both are plain blocking code, safe to call from several threads at once: the provider
runs them on its own thread pool inside Synapse, and the command-line tools call them
directly. A blob's name is its SHA-256 (``ab/cd/<sha256>``), so writing the same name
twice can only ever write the same bytes; that is what makes every race between
uploaders harmless.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

import attr

from synapse_msc3916.config import StorageConfig

logger = logging.getLogger(__name__)


class CopyUnsupported(Exception):
    """The store refused ``CopyObject`` as not implemented (501 / ``NotImplemented``)."""


class StorageUnavailable(Exception):
    """The blob store could not be reached or answered with a server error.

    Distinct from "not found": a missing object lets Synapse try its next source,
    an outage must surface as a 5xx instead of a misleading 404.
    """


def blob_name(sha256: str) -> str:
    return f"{sha256[0:2]}/{sha256[2:4]}/{sha256}"


def sha_from_name(name: str) -> str | None:
    parts = name.split("/")
    if len(parts) != 3:
        return None
    a, b, sha = parts
    if (
        len(sha) == 64
        and sha[0:2] == a
        and sha[2:4] == b
        and all(c in "0123456789abcdef" for c in sha)
    ):
        return sha
    return None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ObjectInfo:
    name: str  # blob name, or legacy key relative to the legacy prefix
    size: int
    mtime: float  # seconds since the epoch


class BlobReader(Protocol):
    size: int

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class BlobStore(Protocol):
    def put_file(self, sha256: str, source: str, length: int, overwrite: bool = False) -> bool:
        """Store the file at ``source``; False if the blob existed and nothing was written."""

    def open(self, sha256: str) -> BlobReader | None: ...

    def stat(self, sha256: str) -> int | None:
        """The object's size, or None if it does not exist (errors raise)."""

    def delete(self, sha256: str) -> None: ...

    def delete_many(self, sha256s: list[str]) -> dict[str, str]:
        """Delete several objects; the ones that failed, with why (missing is success)."""

    def list_blobs(self, after: str = "") -> Iterator[ObjectInfo]: ...

    def describe(self) -> str: ...


# --- directory ------------------------------------------------------------------


class _FileReader:
    def __init__(self, f: BinaryIO):
        self._f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, n: int) -> bytes:
        return self._f.read(n)

    def close(self) -> None:
        self._f.close()


def _fsync_directory(path: str) -> None:
    """Make the entries of directory ``path`` (a new name, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileBlobStore:
    """Blobs as files under ``directory/ab/cd/<sha256>``.

    A blob appears under its final name only once complete: it is written to a
    temporary file in the same directory, flushed, and then hard-linked into place
    (``link`` fails if the name exists, which makes creation exclusive) or renamed over
    a known-corrupt copy. A crash leaves at most a ``.tmp-*`` file, which ``gc`` ignores
    and an admin may delete.

    Durable before acknowledged: the file's bytes, the directory entry that names it
    and every directory created for it are fsynced before ``put_file`` returns, so a
    power loss cannot lose an object the index already records as stored.
    """

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)

    def describe(self) -> str:
        return f"directory {self.directory}"

    def _path(self, sha256: str) -> str:
        return os.path.join(self.directory, blob_name(sha256))

    def put_file(self, sha256: str, source: str, length: int, overwrite: bool = False) -> bool:
        final = self._path(sha256)
        if not overwrite and os.path.exists(final):
            return False
        folder = os.path.dirname(final)
        try:
            self._makedirs_durable(folder)
            tmp = os.path.join(folder, f".tmp-{sha256[:16]}-{secrets.token_hex(6)}")
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            try:
                if overwrite:
                    os.replace(tmp, final)
                else:
                    try:
                        os.link(tmp, final)
                    except FileExistsError:
                        return False
                _fsync_directory(folder)
                return True
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            if e.errno == errno.ENOENT and not os.path.exists(source):
                raise
            raise StorageUnavailable(f"cannot write {final}: {e.strerror}") from e

    def _makedirs_durable(self, folder: str) -> None:
        """``makedirs`` that also fsyncs the parent of each directory it creates (a new
        directory's entry is otherwise as volatile as a new file's)."""
        missing = []
        current = folder
        while not os.path.isdir(current):
            missing.append(current)
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:
                pass  # a concurrent writer made it, and fsyncs its parent itself
            _fsync_directory(os.path.dirname(path))

    def open(self, sha256: str) -> BlobReader | None:
        try:
            return _FileReader(open(self._path(sha256), "rb"))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageUnavailable(f"cannot read blob {sha256}: {e.strerror}") from e

    def stat(self, sha256: str) -> int | None:
        try:
            return os.stat(self._path(sha256)).st_size
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageUnavailable(f"cannot stat blob {sha256}: {e.strerror}") from e

    def delete(self, sha256: str) -> None:
        try:
            os.unlink(self._path(sha256))
        except FileNotFoundError:
            pass
        except OSError as e:
            # The deletion job and gc handle this type: they release their mark and try
            # again later, instead of leaving a mark nobody retries.
            raise StorageUnavailable(f"cannot delete blob {sha256}: {e.strerror}") from e

    def delete_many(self, sha256s: list[str]) -> dict[str, str]:
        """One unlink each (a directory has no batch delete); failures by hash."""
        failed: dict[str, str] = {}
        for sha256 in sha256s:
            try:
                self.delete(sha256)
            except StorageUnavailable as e:
                failed[sha256] = str(e)
        return failed

    def list_blobs(self, after: str = "") -> Iterator[ObjectInfo]:
        """Every blob, in hash order (as S3 lists keys), so ``gc`` can merge with the index;
        only hashes greater than ``after`` (where a resumed ``gc`` goes on)."""
        for root, dirs, files in os.walk(self.directory):
            dirs.sort()
            if after:
                # Skip the ab/ and ab/cd/ directories wholly before ``after``.
                rel_root = os.path.relpath(root, self.directory)
                level = "" if rel_root == "." else rel_root.replace(os.sep, "")
                if len(level) < 4:
                    dirs[:] = [d for d in dirs if level + d >= after[: len(level) + len(d)]]
            for name in sorted(files):
                if after and name <= after:
                    continue
                rel = os.path.relpath(os.path.join(root, name), self.directory)
                if sha_from_name(rel.replace(os.sep, "/")) is None:
                    continue
                try:
                    st = os.stat(os.path.join(root, name))
                except FileNotFoundError:
                    continue
                yield ObjectInfo(rel.replace(os.sep, "/"), st.st_size, st.st_mtime)


# --- S3 -----------------------------------------------------------------------------

# Only a missing *object* is a miss. ``NoSuchBucket``, ``AccessDenied`` and every other
# error are failures: answering "not found" for them would make Synapse serve 404s for
# media that exist (and would make a deleted bucket look like an empty one).
_MISSING = {"404", "NoSuchKey", "NotFound"}


class _S3Reader:
    def __init__(self, response: dict[str, Any]):
        self._body = response["Body"]
        self.size = int(response["ContentLength"])

    def read(self, n: int) -> bytes:
        try:
            return bytes(self._body.read(n))
        except Exception as e:
            raise StorageUnavailable(f"S3 read failed: {e}") from e

    def close(self) -> None:
        try:
            self._body.close()
        except Exception:
            pass


def region_from_location(constraint: str | None) -> str:
    """A region from GetBucketLocation's answer: S3 gives no constraint for us-east-1,
    and the old alias ``EU`` for eu-west-1."""
    if not constraint:
        return "us-east-1"
    return "eu-west-1" if constraint == "EU" else constraint


class S3BlobStore:
    """Blobs as objects ``prefix + ab/cd/<sha256>`` in one bucket.

    Creation is conditional (``If-None-Match: *``, honoured by AWS S3 since 2024 and by
    SeaweedFS, checked by the test suite), so concurrent uploads of the same content
    create the object once and the others get 412, which means "already there". If a
    store ignores the header the second PUT simply rewrites identical bytes under the
    same name, which is harmless: readers see either version, and both are the same.
    A store that rejects the header as unsupported (501/400 NotImplemented) is handled
    by falling back to HEAD-then-PUT, with the same reasoning.
    """

    def __init__(self, config: StorageConfig):
        import boto3
        from botocore.config import Config

        self.config = config
        self.bucket = config.bucket or ""
        self.prefix = config.prefix
        self._conditional = True
        self._signer: Any = None
        checksums = {
            key: value
            for key, value in (
                ("request_checksum_calculation", config.request_checksum_calculation),
                ("response_checksum_validation", config.response_checksum_validation),
            )
            if value is not None
        }
        session = boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region_name,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            aws_session_token=config.session_token,
            config=Config(
                max_pool_connections=config.max_pool_connections,
                connect_timeout=config.connect_timeout,
                read_timeout=config.read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                **checksums,
            ),
        )

    def signer(self) -> Any:
        """The client that presigns URLs, built once.

        The signature covers the Host, so URLs are signed by a second client that knows
        the public endpoint (``redirect.public_endpoint_url``) when there is one, and for
        ``region_name`` (discovered at start-up when not configured): AWS refuses a URL
        signed for another region.
        """
        signer = self._signer
        if signer is None:
            import boto3
            from botocore.config import Config

            endpoint = self.config.redirect.public_endpoint_url or self.config.endpoint_url
            signer = self._signer = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint,
                region_name=self.config.region_name,
                aws_access_key_id=self.config.access_key_id,
                aws_secret_access_key=self.config.secret_access_key,
                aws_session_token=self.config.session_token,
                config=Config(signature_version="s3v4"),
            )
        return signer

    def presign_get(
        self, sha256: str, expires: int, content_type: str | None, disposition: str | None
    ) -> str:
        """A SigV4 presigned GET of a blob, for the endpoint clients reach.

        No S3 call, but not free of network either: botocore refreshes expiring
        credentials (IAM role, IRSA, SSO) with blocking HTTP while signing, so this runs
        on the provider's thread pool. The response-* overrides make S3 answer with
        Synapse's own headers.
        """
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(sha256)}
        if content_type:
            params["ResponseContentType"] = content_type
        if disposition:
            params["ResponseContentDisposition"] = disposition
        url = str(
            self.signer().generate_presigned_url("get_object", Params=params, ExpiresIn=expires)
        )
        # Which thread signed: never the reactor's (see above); the tests read this line.
        logger.debug("synapse_msc3916: presigned %s on thread %s", sha256,
                     threading.current_thread().name)
        return url

    def bucket_region(self) -> str:
        """The bucket's region, asked of S3 (raises StorageUnavailable when it cannot say).

        AWS names it in ``x-amz-bucket-region`` on every HEAD of the bucket, even one it
        refuses or redirects; other stores (SeaweedFS, MinIO) answer GetBucketLocation.
        """
        from botocore.exceptions import ClientError

        try:
            answer = self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            answer = getattr(e, "response", None) or {}
            if not answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
                "x-amz-bucket-region"
            ):
                raise self._unavailable("HEAD bucket", e) from e
        except Exception as e:
            raise self._unavailable("HEAD bucket", e) from e
        region = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
            "x-amz-bucket-region"
        )
        if region:
            return str(region)
        try:
            location = self.client.get_bucket_location(Bucket=self.bucket)
        except Exception as e:
            raise self._unavailable("GetBucketLocation", e) from e
        return region_from_location(location.get("LocationConstraint"))

    def describe(self) -> str:
        where = self.config.endpoint_url or "AWS"
        return f"s3://{self.bucket}/{self.prefix} at {where}"

    def _sse(self) -> dict[str, str]:
        if not self.config.sse_customer_key:
            return {}
        return {
            "SSECustomerKey": self.config.sse_customer_key,
            "SSECustomerAlgorithm": self.config.sse_customer_algo,
        }

    def key(self, sha256: str) -> str:
        return self.prefix + blob_name(sha256)

    @staticmethod
    def _code(e: Exception) -> str:
        response = getattr(e, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _unavailable(self, what: str, e: Exception) -> StorageUnavailable:
        return StorageUnavailable(f"S3 {what} on bucket {self.bucket!r} failed: {e}")

    def head_key(self, key: str) -> dict[str, Any] | None:
        """HEAD an object: its response, or None if the object does not exist.

        A HEAD answer has no body, so a missing bucket is a bare 404 just like a missing
        key; a 404 is therefore confirmed with a HEAD of the bucket before it is believed.
        """
        from botocore.exceptions import ClientError

        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key, **self._sse()))
        except ClientError as e:
            if self._code(e) not in _MISSING:
                raise self._unavailable("HEAD", e) from e
        except Exception as e:
            raise self._unavailable("HEAD", e) from e
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._unavailable("HEAD bucket", e) from e
        return None

    def exists_key(self, key: str) -> bool:
        return self.head_key(key) is not None

    def stat(self, sha256: str) -> int | None:
        head = self.head_key(self.key(sha256))
        return None if head is None else int(head["ContentLength"])

    def put_file(self, sha256: str, source: str, length: int, overwrite: bool = False) -> bool:
        from botocore.exceptions import ClientError

        key = self.key(sha256)
        extra: dict[str, Any] = {"StorageClass": self.config.storage_class, **self._sse()}
        if not overwrite and not self._conditional and self.exists_key(key):
            return False
        if not overwrite and self._conditional:
            extra["IfNoneMatch"] = "*"
        try:
            with open(source, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentLength=length, **extra
                )
            return True
        except ClientError as e:
            code = self._code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            if code in ("NotImplemented", "501") and "IfNoneMatch" in extra:
                self._conditional = False
                return self.put_file(sha256, source, length, overwrite)
            raise self._unavailable("PUT", e) from e
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._unavailable("PUT", e) from e

    # CopyObject copies at most 5 GiB in one call (beyond, only UploadPartCopy can).
    COPY_MAX_BYTES = 5 << 30

    def copy_key_to_blob(
        self, source_key: str, sha256: str, overwrite: bool = False
    ) -> tuple[bool, str | None]:
        """Server-side copy (``CopyObject``) of ``source_key`` in this bucket to blob
        ``sha256``: (written, the copy's SHA-256 as S3 computed it, hex, or None).

        The copy is unverified: the caller names it by the hash it expects and must check
        it (the returned checksum, else a read-back) before trusting it. Conditional like
        ``put_file`` (False: the blob existed, nothing written). The copy gets fresh
        metadata (``REPLACE``: none of the legacy object's) and this store's storage
        class, as a ``put_file`` would; under SSE-C the source is read with the same key
        (synapse-s3-storage-provider encrypts with the key it is configured with, the
        one ``legacy_prefix`` objects are read with). S3 returns a full-object SHA-256
        only when the source is not a multipart object (a composite checksum ``…-N``, or
        ``ChecksumType: COMPOSITE``, is not the hash of the bytes: None then); SeaweedFS
        4.48 returns none at all. Raises ``CopyUnsupported`` on a 501.
        """
        from botocore.exceptions import ClientError

        key = self.key(sha256)
        extra: dict[str, Any] = {
            "StorageClass": self.config.storage_class,
            "MetadataDirective": "REPLACE",
            "ChecksumAlgorithm": "SHA256",
            **self._sse(),
        }
        if self.config.sse_customer_key:
            extra["CopySourceSSECustomerKey"] = self.config.sse_customer_key
            extra["CopySourceSSECustomerAlgorithm"] = self.config.sse_customer_algo
        if not overwrite and not self._conditional and self.exists_key(key):
            return False, None
        if not overwrite and self._conditional:
            extra["IfNoneMatch"] = "*"
        try:
            answer = self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
                **extra,
            )
        except ClientError as e:
            code = self._code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False, None
            if code in ("NotImplemented", "501"):
                raise CopyUnsupported(f"S3 CopyObject on bucket {self.bucket!r}: {e}") from e
            raise self._unavailable("CopyObject", e) from e
        except Exception as e:
            raise self._unavailable("CopyObject", e) from e
        result = answer.get("CopyObjectResult") or {}
        checksum = result.get("ChecksumSHA256")
        if not checksum or result.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return True, None
        try:
            digest = base64.b64decode(str(checksum), validate=True)
        except (binascii.Error, ValueError):
            return True, None  # "…-N": a multipart source's checksum of checksums
        return True, digest.hex() if len(digest) == 32 else None

    def open_key(self, key: str) -> BlobReader | None:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key, **self._sse())
        except ClientError as e:
            if self._code(e) in _MISSING:
                return None
            raise self._unavailable("GET", e) from e
        except Exception as e:
            raise self._unavailable("GET", e) from e
        return _S3Reader(response)

    def open(self, sha256: str) -> BlobReader | None:
        return self.open_key(self.key(sha256))

    def delete_key(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            if self._code(e) in _MISSING:
                return
            raise self._unavailable("DELETE", e) from e

    def delete(self, sha256: str) -> None:
        self.delete_key(self.key(sha256))

    def delete_keys(self, keys: list[str]) -> dict[str, str]:
        """``DeleteObjects``, 1,000 keys a call (S3's limit): the keys that failed, with
        why. A missing key is deleted as far as S3 is concerned (no error)."""
        failed: dict[str, str] = {}
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except Exception as e:
                raise self._unavailable("DeleteObjects", e) from e
            for error in response.get("Errors", []):
                if str(error.get("Code", "")) not in _MISSING:
                    failed[str(error.get("Key"))] = (
                        f"{error.get('Code')}: {error.get('Message', '')}"
                    )
        return failed

    def delete_many(self, sha256s: list[str]) -> dict[str, str]:
        failed = self.delete_keys([self.key(s) for s in sha256s])
        return {s: failed[self.key(s)] for s in sha256s if self.key(s) in failed}

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects under ``prefix``, named relative to it, in key order; only those after
        ``prefix + start_after`` when given (where a resumed tool goes on)."""
        extra = {"StartAfter": prefix + start_after} if start_after else {}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        obj["Key"][len(prefix) :],
                        int(obj["Size"]),
                        obj["LastModified"].timestamp(),
                    )
        except StorageUnavailable:
            raise
        except Exception as e:
            raise self._unavailable("LIST", e) from e

    def list_blobs(self, after: str = "") -> Iterator[ObjectInfo]:
        for info in self.list_keys(self.prefix, blob_name(after) if after else ""):
            if sha_from_name(info.name) is not None:
                yield info


def hash_blob(store: BlobStore, sha256: str) -> tuple[str, int] | None:
    """SHA-256 and length of a stored object as read back, or None if it is missing.

    What ``migrate`` and ``scrub`` use to verify an object: a name is only trusted once
    the bytes under it hash to it.
    """
    reader = store.open(sha256)
    if reader is None:
        return None
    digest = hashlib.sha256()
    length = 0
    try:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            length += len(chunk)
    finally:
        reader.close()
    return digest.hexdigest(), length


def make_blobstore(config: StorageConfig) -> FileBlobStore | S3BlobStore:
    if config.backend == "file":
        assert config.directory is not None
        return FileBlobStore(config.directory)
    return S3BlobStore(config)
