"""S3 outages (a private SeaweedFS that is stopped and started) and temp-file uploads."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import (
    crash,
    download,
    png,
    private_seaweedfs_at,
    provider_entry,
    s3_config,
    wipe_local_media,
)


@pytest.fixture(scope="module")
def private_seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One for the module: each test leaves it running."""
    with private_seaweedfs_at(tmp_path_factory.mktemp("seaweedfs-outage")) as server:
        yield server


def _upload_status(hs: Synapse, token: str, data: bytes) -> tuple[int, dict]:
    resp = request(
        "POST",
        hs.base_url,
        "/_matrix/media/v3/upload?filename=x.bin",
        {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        data,
    )
    return resp.status, resp.json()


def test_s3_down_during_store_fails_clearly_and_loses_nothing(
    synapse_factory: Callable[..., Synapse], private_seaweedfs: SeaweedFS
) -> None:
    sw = private_seaweedfs
    sw.create_bucket("outage-store")
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(sw, "outage-store"))]).start()
    token = hs.register("alice")
    before = os.urandom(120_000)
    kept = hs.upload(token, before)

    crash(sw)
    try:
        started = time.monotonic()
        status, body = _upload_status(hs, token, os.urandom(80_000))
        print(f"upload with S3 down answered {status} in {time.monotonic() - started:.2f}s")
        assert 500 <= status < 600, body
        assert "storage" in body.get("error", "").lower(), body
        assert "media storage store failed" in hs.output()
        # A dedup hit needs no S3 call and still succeeds while S3 is down.
        assert _upload_status(hs, token, before)[0] == 200
    finally:
        sw.start()

    wipe_local_media(hs)
    resp = download(hs, token, kept)
    assert resp.status == 200 and resp.body == before
    after = os.urandom(80_000)
    again = hs.upload(token, after)
    wipe_local_media(hs)
    assert download(hs, token, again).body == after


def test_s3_down_during_read_is_5xx_then_recovers(
    synapse_factory: Callable[..., Synapse], private_seaweedfs: SeaweedFS
) -> None:
    sw = private_seaweedfs
    sw.create_bucket("outage-read")
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(sw, "outage-read"))]).start()
    token = hs.register("alice")
    data = os.urandom(200_000)
    media_id = hs.upload(token, data)
    wipe_local_media(hs)

    crash(sw)
    try:
        started = time.monotonic()
        resp = download(hs, token, media_id)
        print(f"download with S3 down answered {resp.status} in {time.monotonic() - started:.2f}s")
        assert 500 <= resp.status < 600, resp
        assert resp.json()["errcode"] == "M_UNKNOWN"
        assert "storage" in resp.json()["error"].lower()
    finally:
        sw.start()
    resp = download(hs, token, media_id)
    assert resp.status == 200 and resp.body == data


def test_without_local_media_storage_uploads_reach_the_provider(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    seaweedfs.create_bucket("no-local-store")
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, "no-local-store"))],
        extra_config={"enable_local_media_storage": False},
    ).start()
    token = hs.register("alice")
    data = os.urandom(150_000)
    media_id = hs.upload(token, data, "application/pdf", "doc.pdf")
    image = png(320, 240, (0, 200, 0))
    img_id = hs.upload(token, image, "image/png", "green.png")
    assert (
        not any(p.is_file() for p in hs.media_store.rglob("*")) if hs.media_store.exists() else True
    )
    resp = download(hs, token, media_id)
    assert resp.status == 200 and resp.body == data
    assert download(hs, token, img_id).body == image
    thumb = hs.get(
        f"/_matrix/client/v1/media/thumbnail/{hs.server_name}/{img_id}?width=32&height=32",
        token,
    )
    assert thumb.status == 200 and thumb.body.startswith(b"\x89PNG")
    assert len(seaweedfs.list_keys("no-local-store")) >= 3  # two originals + thumbnails


@pytest.mark.single_process
def test_without_local_media_storage_store_synchronous_is_required(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """Without store_synchronous Synapse deletes the temp file before a background store
    could read it: refuse to start, naming the key."""
    seaweedfs.create_bucket("no-local-store-async")
    bad = synapse_factory(
        storage_providers=[
            provider_entry(s3_config(seaweedfs, "no-local-store-async"), synchronous=False)
        ],
        extra_config={"enable_local_media_storage": False},
    )
    code, output = bad.start_expecting_failure()
    assert code != 0 and "store_synchronous" in output, output[-2000:]


def test_s3_that_accepts_but_never_answers_gives_5xx_not_a_hang(
    synapse_factory: Callable[..., Synapse],
) -> None:
    """A black hole: TCP connects, no byte ever comes back. Timeouts must end it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def swallow() -> None:
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hole.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        config = {
            "backend": "s3",
            "bucket": "black-hole",
            "endpoint_url": f"http://127.0.0.1:{hole.getsockname()[1]}",
            "region_name": "us-east-1",
            "access_key_id": "x",
            "secret_access_key": "y",
            "connect_timeout": 1,
            "read_timeout": 1,
        }
        hs = synapse_factory(storage_providers=[provider_entry(config)]).start()
        token = hs.register("alice")
        started = time.monotonic()
        status, body = _upload_status(hs, token, os.urandom(10_000))
        elapsed = time.monotonic() - started
        print(f"upload into a black hole answered {status} after {elapsed:.2f}s")
        assert 500 <= status < 600, body
        assert accepted  # it really did connect and wait
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        hole.close()
