"""Synapse's media deletions followed into the bucket (real Synapse, real SeaweedFS).

The provider runs with ``delete_after: 0s``: an object goes at the deletion job's next
tick (5 s) once nothing references it, without any ``gc``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import TOPOLOGY, SeaweedFS, Synapse, request, wait_for
from tests.storage_helpers import download, png, provider_entry, s3_config, thumbnail, wipe_local_media
from tests.test_storage_s3 import index_rows, sha
from tests.web_client import RecordingProxy

DEADLINE = 60.0  # delete_after (0 s) + 60 s, as promised


def _admin(hs: Synapse, method: str, path: str, token: str, body: bytes | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    resp = request(method, hs.base_url, path, headers, body)
    assert resp.status == 200, resp
    return resp.json()


def _delete_media(hs: Synapse, token: str, media_id: str) -> None:
    _admin(hs, "DELETE", f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}", token)


def _wait_gone(seaweedfs: SeaweedFS, bucket: str, shas: set[str]) -> None:
    names = {blob_name(s) for s in shas}
    wait_for(lambda: not names & set(seaweedfs.list_keys(bucket)), DEADLINE, f"objects {sorted(shas)} deleted")


@pytest.mark.compat
def test_admin_deletions_are_followed_into_the_bucket(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "lifecycle-admin"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after="0s"))]
    ).start()
    admin = hs.register("admin", admin=True)
    bob = hs.register("bob")
    shared, unique, bobs, older = (os.urandom(n) for n in (40_000, 50_000, 60_000, 70_000))
    s1, s2 = hs.upload(admin, shared), hs.upload(admin, shared)
    u = hs.upload(admin, unique)
    img = hs.upload(admin, png(300, 200, (9, 8, 7)), "image/png", "p.png")
    assert thumbnail(hs, admin, img).status == 200
    img_shas = {r[1] for r in index_rows(hs, "file_id = ?", (img,))}
    assert len(img_shas) >= 2  # the original and at least one thumbnail
    b1 = hs.upload(bob, bobs)
    o1 = hs.upload(admin, older)
    deleted_before = hs.metric_value("synapse_msc3916_storage_objects_deleted_total")

    # One of two media sharing a content: the object stays, the other still downloads.
    _delete_media(hs, admin, s1)
    _delete_media(hs, admin, u)
    _wait_gone(seaweedfs, bucket, {sha(unique)})
    assert blob_name(sha(shared)) in seaweedfs.list_keys(bucket)
    wipe_local_media(hs)
    assert download(hs, admin, s2).body == shared
    assert download(hs, admin, u).status == 404

    # The last media of a content, and an image with its thumbnails.
    _delete_media(hs, admin, s2)
    _delete_media(hs, admin, img)
    _wait_gone(seaweedfs, bucket, {sha(shared), *img_shas})

    # A user's media, and media older than a date.
    _admin(hs, "DELETE", f"/_synapse/admin/v1/users/@bob:{hs.server_name}/media", admin)
    _wait_gone(seaweedfs, bucket, {sha(bobs)})
    assert download(hs, bob, b1).status == 404
    cut = int(time.time() * 1000) + 1000
    assert o1 in _admin(
        hs, "POST", f"/_synapse/admin/v1/media/delete?before_ts={cut}", admin, b"{}"
    )["deleted_media"]
    _wait_gone(seaweedfs, bucket, {sha(older)})
    assert seaweedfs.list_keys(bucket) == []
    assert index_rows(hs) == []
    assert hs.sql("SELECT COUNT(*) FROM msc3916_storage_blobs") == [(0,)]
    assert hs.sql("SELECT COUNT(*) FROM msc3916_storage_tombstones") == [(0,)]
    gone = 4 + len(img_shas)
    assert hs.metric_value("synapse_msc3916_storage_objects_deleted_total") - deleted_before == gone
    assert hs.metric_value("synapse_msc3916_storage_bytes_deleted_total") >= 220_000

    if TOPOLOGY == "workers":
        # The job ran in exactly one process: the media worker holding its lease.
        metrics = _process_metrics(hs)
        per_process = {name: _deleted_on(text) for name, text in metrics.items()}
        (runner,) = [name for name, text in metrics.items() if _gauge(text, LEASE_HELD) == 1.0]
        assert per_process.pop(runner) == gone and set(per_process.values()) == {0.0}, per_process
        _hand_over_the_job(hs, seaweedfs, bucket, admin, runner)

    # Deleted content uploaded again is stored and served.
    again = hs.upload(bob, unique)
    wipe_local_media(hs)
    assert download(hs, bob, again).body == unique
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(unique))]

    # The job's state is in the database: a deletion the process had no time to act
    # on before a restart is carried out after it.
    doomed = os.urandom(20_000)
    _delete_media(hs, admin, hs.upload(admin, doomed))
    hs.restart()
    _wait_gone(seaweedfs, bucket, {sha(doomed)})
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(unique))]


def test_one_media_worker_and_no_background_jobs_instance_runs_the_job(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """Workers: one media worker, ``media_instance_running_background_jobs`` unset, the
    main process with ``enable_media_repo: false`` (it loads no storage provider). Single:
    one process on SQLite. The media process takes the deletion job's database lease and
    a deleted media's object goes.

    Before the lease (workers topology) the job ran only on the main process, which has
    no provider, so it never ran: ``_wait_gone`` timed out after 60 s with the object
    still in the bucket.
    """
    bucket = "lifecycle-lease"
    seaweedfs.create_bucket(bucket)
    kwargs: dict[str, Any] = {}
    if TOPOLOGY == "workers":
        kwargs = {"media_workers": 1, "extra_config": {"media_instance_running_background_jobs": None}}
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after="0s"))], **kwargs
    ).start()
    if TOPOLOGY == "workers":
        assert "media_instance_running_background_jobs" not in hs.config
        assert hs.config["enable_media_repo"] is False
    admin = hs.register("admin", admin=True)
    content = os.urandom(30_000)
    media_id = hs.upload(admin, content)
    assert blob_name(sha(content)) in seaweedfs.list_keys(bucket)
    _delete_media(hs, admin, media_id)
    _wait_gone(seaweedfs, bucket, {sha(content)})

    holder = "media1" if TOPOLOGY == "workers" else "master"
    assert [r[0] for r in hs.sql("SELECT instance FROM msc3916_storage_leases")] == [holder]
    assert f"synapse_msc3916: this process ({holder}) took the storage deletion job's lease" in hs.output()
    if TOPOLOGY == "workers":
        held = {name: _gauge(text, LEASE_HELD) for name, text in _process_metrics(hs).items()}
        assert held["media1"] == 1.0 and held["main"] in (None, 0.0), held  # main loads no provider
    else:
        assert hs.metric_value(LEASE_HELD) == 1.0


LEASE_HELD = "synapse_msc3916_storage_deletion_lease_held"


def _hand_over_the_job(hs: Any, seaweedfs: SeaweedFS, bucket: str, admin: str, runner: str) -> None:
    """The worker running the job stops (a clean shutdown releases its lease): the other
    media worker takes the job over at its next tick and deletes what is due."""
    holder = next(w for w in hs.workers if w.name == runner)
    other = next(w for w in hs.workers if w.name != runner)
    holder.stop()
    try:
        content = os.urandom(25_000)
        media_id = other.upload(admin, content)  # straight to the live worker, not the proxy
        r = request("DELETE", other.base_url, f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
                    {"Authorization": f"Bearer {admin}"})
        assert r.status == 200, r
        _wait_gone(seaweedfs, bucket, {sha(content)})
        port = other.config["worker_listeners"][-1]["port"]
        text = request("GET", f"http://127.0.0.1:{port}", "/_synapse/metrics").body.decode()
        assert _gauge(text, LEASE_HELD) == 1.0
        assert f"this process ({other.name}) took the storage deletion job's lease over from {runner}" in hs.output()
    finally:
        holder.start()


def _gauge(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def _process_metrics(hs: Any) -> dict[str, str]:
    texts = {"main": request("GET", f"http://127.0.0.1:{hs.metrics_port}", "/_synapse/metrics").body.decode()}
    for worker in hs.workers:
        port = worker.config["worker_listeners"][-1]["port"]
        texts[worker.name] = request("GET", f"http://127.0.0.1:{port}", "/_synapse/metrics").body.decode()
    return texts


def _deleted_on(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("synapse_msc3916_storage_objects_deleted_total "):
            return float(line.split()[-1])
    return 0.0


def test_reuploads_before_during_and_after_deletion_are_kept(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """Each round: upload a content, delete it, upload it again after a random pause
    (before, while or after the job deletes its object). The second upload is
    acknowledged, so it must stay readable from the bucket."""
    bucket = "lifecycle-reupload"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after="0s"))]
    ).start()
    admin = hs.register("admin", admin=True)
    rng = random.Random(3916)
    kept: list[tuple[str, bytes]] = []
    present_seen = absent_seen = 0
    for delay in (0.0, *(rng.uniform(0.0, 7.0) for _ in range(6)), 12.0):
        content = os.urandom(80_000)
        _delete_media(hs, admin, hs.upload(admin, content))
        time.sleep(delay)
        if blob_name(sha(content)) in seaweedfs.list_keys(bucket):
            present_seen += 1  # uploaded again before the object went (or while)
        else:
            absent_seen += 1  # uploaded again after the deletion
        kept.append((hs.upload(admin, content), content))
    # Both sides of the deletion were really exercised.
    assert present_seen >= 1 and absent_seen >= 1, (present_seen, absent_seen)
    time.sleep(7)  # another tick: nothing acknowledged may go
    wipe_local_media(hs)
    for media_id, content in kept:
        resp = download(hs, admin, media_id)
        assert resp.status == 200 and resp.body == content, media_id
    assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(c)) for _, c in kept)


@pytest.mark.compat
@pytest.mark.skipif(TOPOLOGY == "workers", reason="media retention runs on the media workers' own app")
def test_media_retention_is_followed_into_the_bucket(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "lifecycle-retention"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after="0s"))],
        extra_config={"media_retention": {"local_media_lifetime": "8s"}},
    )
    hs.start(app="tests.retention_homeserver")
    alice = hs.register("alice")
    old = os.urandom(30_000)
    old_id = hs.upload(alice, old)
    # Retention purges it 8 s after its last access, then the job deletes the object.
    _wait_gone(seaweedfs, bucket, {sha(old)})
    assert download(hs, alice, old_id).status == 404
    assert hs.sql("SELECT COUNT(*) FROM msc3916_storage_paths") == [(0,)]


@pytest.mark.compat
def test_purge_media_cache_is_followed_into_the_bucket(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "lifecycle-remote"
    seaweedfs.create_bucket(bucket)
    a = synapse_factory(name="origin", tls=True).start()
    b = synapse_factory(
        name="cache",
        tls=True,
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after="0s"))],
    ).start()
    alice, bob = a.register("alice"), b.register("bob")
    admin = b.register("admin", admin=True)
    both, remote_only = os.urandom(45_000), os.urandom(55_000)
    r1, r2 = a.upload(alice, both), a.upload(alice, remote_only)
    for media_id, data in ((r1, both), (r2, remote_only)):
        resp = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{media_id}", bob)
        assert resp.status == 200 and resp.body == data
    local = b.upload(bob, both)  # the same bytes as a local media on B
    assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(d)) for d in (both, remote_only))

    cut = int(time.time() * 1000) + 1000
    purged = _admin(b, "POST", f"/_synapse/admin/v1/purge_media_cache?before_ts={cut}", admin, b"{}")
    assert purged["deleted"] == 2
    _wait_gone(seaweedfs, bucket, {sha(remote_only)})
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(both))]
    assert index_rows(b, "media_origin IS NOT NULL") == []
    wipe_local_media(b)
    assert download(b, bob, local).body == both
    # Fetched again from the origin, the remote media is stored again.
    again = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{r2}", bob)
    assert again.status == 200 and again.body == remote_only
    wait_for(lambda: blob_name(sha(remote_only)) in seaweedfs.list_keys(bucket), 10, "re-stored")


def test_a_mass_deletion_is_deleted_in_batches_and_spares_every_live_object(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """A user's 300 media deleted at once: the job deletes their objects many at a time
    (``DeleteObjects`` calls carrying many keys, several batches of ``delete_jobs``),
    never an object another user's media still names (100 of the 300 contents were
    uploaded again by alice).

    Before the batches (one ``DeleteObject`` per key) this failed with
    ``AssertionError: single-key DELETEs: 200 (DeleteObjects calls: [])``.
    """
    bucket = "lifecycle-mass"
    seaweedfs.create_bucket(bucket)
    proxy = RecordingProxy(seaweedfs.endpoint_url).start()
    try:
        config = s3_config(seaweedfs, bucket, delete_after="0s", delete_jobs=4)
        config["endpoint_url"] = proxy.url
        hs = synapse_factory(storage_providers=[provider_entry(config)]).start()
        admin = hs.register("admin", admin=True)
        bob, alice = hs.register("bob"), hs.register("alice")
        contents = [os.urandom(1000 + i) for i in range(300)]
        for content in contents:
            hs.upload(bob, content)
        kept = [(hs.upload(alice, c), c) for c in contents[:100]]
        assert len(seaweedfs.list_keys(bucket)) == 300
        deleted_before = hs.metric_value("synapse_msc3916_storage_objects_deleted_total")
        mark = len(proxy.seen())

        media = _admin(
            hs, "DELETE", f"/_synapse/admin/v1/users/@bob:{hs.server_name}/media?limit=1000", admin
        )
        assert media["total"] == 300
        _wait_gone(seaweedfs, bucket, {sha(c) for c in contents[100:]})
        seen = proxy.seen()[mark:]
        batches = [s.keys for s in seen if s.method == "POST" and "delete" in s.path.split("?")[-1]]
        singles = [s for s in seen if s.method == "DELETE"]
        assert not singles, f"single-key DELETEs: {len(singles)} (DeleteObjects calls: {batches})"
        assert sum(batches) == 200, batches
        # Many keys a call: a few calls per tick (up to delete_jobs at once), not one per key.
        assert len(batches) <= 40 and max(batches) >= 10, batches
        assert hs.metric_value("synapse_msc3916_storage_objects_deleted_total") - deleted_before == 200

        # Every content a path still names is in the bucket and readable.
        assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(c)) for _, c in kept)
        named = {r[1] for r in index_rows(hs)}
        assert {blob_name(s) for s in named} == set(seaweedfs.list_keys(bucket))
        wipe_local_media(hs)
        for media_id, content in kept:
            resp = download(hs, alice, media_id)
            assert resp.status == 200 and resp.body == content, media_id
    finally:
        proxy.stop()


@pytest.mark.single_process  # generic_worker prints only "Failed to parse config for module"
def test_a_bad_delete_jobs_stops_synapse_naming_the_key(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    """Before ``delete_jobs`` existed the key was refused as unknown:
    ``AssertionError: ['    synapse_msc3916: delete_jobs: unknown option (known: backend,
    delete_after, directory, redirect, stall_timeout)']``."""
    for bad in (0, "many"):
        hs = synapse_factory(storage_providers=[provider_entry(
            {"backend": "file", "directory": str(tmp_path / "blobs"), "delete_jobs": bad}
        )])
        code, output = hs.start_expecting_failure()
        assert code != 0
        lines = [line for line in output.splitlines() if "synapse_msc3916: delete_jobs:" in line]
        assert len(lines) == 1 and "must be " in lines[0], lines or output[-2000:]
