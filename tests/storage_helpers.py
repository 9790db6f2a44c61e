"""Shared helpers for the storage provider's end-to-end tests."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.harness import SeaweedFS, Synapse

PROVIDER = "synapse_msc3916.DedupStorageProvider"


def provider_entry(config: dict[str, Any], synchronous: bool = True) -> dict[str, Any]:
    return {
        "module": PROVIDER,
        "store_local": True,
        "store_remote": True,
        "store_synchronous": synchronous,
        "config": config,
    }


def s3_config(seaweedfs: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    config = {
        "backend": "s3",
        "bucket": bucket,
        "endpoint_url": seaweedfs.endpoint_url,
        "region_name": "us-east-1",
        "access_key_id": seaweedfs.ACCESS_KEY,
        "secret_access_key": seaweedfs.SECRET_KEY,
        "threadpool_size": 4,
        "connect_timeout": 2,
        "read_timeout": 10,
    }
    config.update(extra)
    return config


def wipe_local_media(hs: Synapse) -> None:
    """Delete every file Synapse keeps locally, so reads must come from the provider."""
    for sub in ("local_content", "local_thumbnails", "remote_content", "remote_thumbnail"):
        shutil.rmtree(hs.media_store / sub, ignore_errors=True)


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def download(hs: Synapse, token: str, media_id: str) -> Any:
    return hs.get(f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}", token)


def thumbnail(
    hs: Synapse, token: str, media_id: str, w: int = 32, h: int = 32, method: str = "scale"
) -> Any:
    return hs.get(
        f"/_matrix/client/v1/media/thumbnail/{hs.server_name}/{media_id}"
        f"?width={w}&height={h}&method={method}",
        token,
    )


def s3_legacy_entry(seaweedfs: Any, bucket: str, prefix: str = "", **extra: Any) -> dict[str, Any]:
    """synapse-s3-storage-provider 1.7 on the same SeaweedFS, configured like ours."""
    return {
        "module": "s3_storage_provider.S3StorageProviderBackend",
        "store_local": True,
        "store_remote": True,
        "store_synchronous": True,
        "config": {
            "bucket": bucket,
            "prefix": prefix,
            "endpoint_url": seaweedfs.endpoint_url,
            "region_name": "us-east-1",
            "access_key_id": seaweedfs.ACCESS_KEY,
            "secret_access_key": seaweedfs.SECRET_KEY,
            **extra,
        },
    }


class SignedSeaweedFS(SeaweedFS):
    """SeaweedFS whose S3 gateway has one identity, so it checks every signature.

    The plain harness SeaweedFS has no identities and serves unsigned requests, so a
    presigned URL's signature and expiry would go unchecked there.
    """

    more_args: list[str] = []  # further ``weed server`` flags (subclasses)

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        import json

        config = self.dir / "s3-identities.json"
        config.write_text(json.dumps({"identities": [{
            "name": "test",
            "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.extra_args = [f"-s3.config={config}", *self.more_args]
        return super().start(timeout)

    def stop(self) -> None:
        """Its data is thrown away: do not wait SeaweedFS's slow SIGTERM shutdown out."""
        from tests.harness import stop_process

        if self.proc is not None:
            stop_process(self.proc, term_timeout=3)
            self.proc = None
            self.log.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def switch_to_dedup(hs: Synapse, seaweedfs: Any, bucket: str) -> None:
    """Phase 2 of a real migration: this module's provider replaces
    synapse-s3-storage-provider (whose objects are under ``legacy/``, the blobs going under
    ``blobs/``), with the local media wiped so that reads come from the bucket."""
    hs.stop()
    hs.config["media_storage_providers"] = [
        provider_entry(s3_config(seaweedfs, bucket, prefix="blobs/", legacy_prefix="legacy/"))
    ]
    hs.write_config()
    wipe_local_media(hs)
    hs.start()


def run_tool(hs: Synapse, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a ``synapse-msc3916`` command against ``hs``'s homeserver.yaml."""
    return subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", *args, "-c", str(hs.config_path)],
        env=hs.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )



class AwsCorsSeaweedFS(SignedSeaweedFS):
    """SignedSeaweedFS whose buckets answer CORS only by their own rules, as AWS S3 does.

    SeaweedFS answers a bucket without CORS rules by its global ``-s3.allowedOrigins``,
    default ``*``: every origin, ``null`` included, so a browser test against it could
    never see a bucket refuse. Set to an origin no browser has, a bucket without rules
    answers no ``Access-Control-Allow-Origin`` (checked by test_browser.py), and a bucket
    with rules answers by them (PutBucketCors is applied).
    """

    NO_ORIGIN = "https://no-bucket-cors-rule.invalid"
    more_args = [f"-s3.allowedOrigins={NO_ORIGIN}"]


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its size is about w x h x 3 bytes
    (big enough to be redirected, and every one is distinct content)."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, "PNG")
    return out.getvalue()


def crash(sw: SeaweedFS) -> None:
    """Kill the S3 server outright (by PID): an outage, not a polite shutdown."""
    assert sw.proc is not None
    os.kill(sw.proc.pid, signal.SIGKILL)
    sw.proc.wait(10)
    sw.proc = None
    sw.log.close()


@contextmanager
def private_seaweedfs_at(directory: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of the tests' own, not the session's, because they crash it; crashed
    at the end too (nothing to keep, and a polite stop takes SeaweedFS 20 s)."""
    server = SeaweedFS(directory).start()
    try:
        yield server
    finally:
        if server.proc is not None:
            crash(server)
