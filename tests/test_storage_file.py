"""The ``file`` backend through a real Synapse, and start-up config validation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Synapse
from tests.storage_helpers import download, provider_entry, wipe_local_media


def _blobs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.compat
def test_file_backend_round_trip_dedups(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})]
    )
    hs.start()
    alice, bob = hs.register("alice"), hs.register("bob")
    data = os.urandom(300_000)
    a = hs.upload(alice, data, "application/octet-stream", "a.bin")
    b = hs.upload(bob, data, "text/plain", "other-name.txt")
    other = hs.upload(alice, b"different content", "text/plain", "c.txt")
    blobs = _blobs(store)
    assert len(blobs) == 2, blobs
    assert {p.read_bytes() for p in blobs} == {data, b"different content"}

    wipe_local_media(hs)
    ra, rb, rc = download(hs, alice, a), download(hs, bob, b), download(hs, alice, other)
    assert ra.status == rb.status == rc.status == 200
    assert ra.body == rb.body == data and rc.body == b"different content"
    assert ra.header("content-type") == "application/octet-stream"
    assert (rb.header("content-type") or "").startswith("text/plain")
    assert "other-name.txt" in (rb.header("content-disposition") or "")
    assert hs.metric_value("synapse_msc3916_storage_dedup_hits_total") >= 1
    assert hs.metric_value("synapse_msc3916_storage_bytes_saved_total") >= len(data)


@pytest.mark.single_process
def test_bad_config_stops_synapse_naming_the_key(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backend": "tape"}, "backend"),
        ({"backend": "file"}, "directory"),
        ({"backend": "s3", "bucket": "ok-bucket", "threadpool_size": "many"}, "threadpool_size"),
        ({"backend": "s3", "bucket": "ok-bucket", "bogus_key": 1}, "bogus_key"),
        ({"backend": "file", "directory": str(tmp_path / "b"), "delete_after": "soon"},
         "synapse_msc3916: delete_after:"),
    ]
    for config, key in cases:
        hs = synapse_factory(storage_providers=[provider_entry(config)])
        code, output = hs.start_expecting_failure()
        assert code != 0
        assert key in output, output[-2000:]


@pytest.mark.compat
def test_migrate_existing_media_store_into_file_backend(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    """A server that had no provider: `migrate` loads its media store, deduplicated."""
    from tests.storage_helpers import png
    from tests.test_storage_s3 import run_tool

    hs = synapse_factory(storage_providers=None).start()
    token = hs.register("alice")
    same = os.urandom(64_000)
    ids = [hs.upload(token, same, filename=f"s{i}") for i in range(3)]
    solo = hs.upload(token, b"only once", "text/plain", "solo.txt")
    img = hs.upload(token, png(320, 240), "image/png", "p.png")
    hs.stop()

    store = tmp_path / "blobs"
    hs.config["media_storage_providers"] = [
        provider_entry({"backend": "file", "directory": str(store)})
    ]
    hs.write_config()
    files = [p for p in hs.media_store.rglob("*") if p.is_file()]
    distinct = {p.read_bytes() for p in files}
    result = run_tool(hs, "migrate", "--min-age", "0s", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == len(files) and report["deduplicated"] >= 2
    assert {p.read_bytes() for p in _blobs(store)} == distinct
    assert len(_blobs(store)) == len(distinct) < len(files)

    hs.start()
    wipe_local_media(hs)
    for media_id in ids:
        assert download(hs, token, media_id).body == same
    assert download(hs, token, solo).body == b"only once"
    assert download(hs, token, img).status == 200


def test_a_failed_file_delete_is_retried_by_the_deletion_job(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    """The file backend's delete fails (the object's name is a non-empty directory, which
    ``unlink`` refuses even to root): the job releases its mark and deletes the object
    at a later tick once the file system lets it.

    Before the fix the raw ``IsADirectoryError`` escaped the job: the blob row kept its
    deleting mark for ever (``stored`` stayed 1, ``deleting_ts`` set), so the wait for
    the released mark below timed out and the object was never deleted.
    """
    from synapse_msc3916.storage.blobstore import blob_name
    from tests.harness import request, wait_for
    from tests.storage_helpers import sha

    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[
            provider_entry({"backend": "file", "directory": str(store), "delete_after": "0s"})
        ]
    ).start()
    admin = hs.register("admin", admin=True)
    data = os.urandom(30_000)
    media_id = hs.upload(admin, data)
    obj = store / blob_name(sha(data))
    aside = tmp_path / "aside"
    obj.rename(aside)
    obj.mkdir()
    (obj / "in-the-way").write_bytes(b"x")

    resp = request(
        "DELETE",
        hs.base_url,
        f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
        {"Authorization": f"Bearer {admin}"},
    )
    assert resp.status == 200, resp

    def row() -> list[tuple]:
        return hs.sql(
            "SELECT stored, deleting_ts FROM msc3916_storage_blobs WHERE sha256 = ?", (sha(data),)
        )

    # The delete failed and the mark was released (not stored any more: the object may
    # or may not be gone), so the content stays due for the next tick.
    wait_for(lambda: row() == [(0, None)], 60, "the failed delete released its mark")
    assert obj.is_dir()

    # The file system lets go: a later tick deletes the object and forgets the content.
    for p in obj.iterdir():
        p.unlink()
    obj.rmdir()
    aside.rename(obj)
    wait_for(lambda: not obj.exists() and row() == [], 60, "the retried delete")
