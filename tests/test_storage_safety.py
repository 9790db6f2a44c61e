"""The store can be trusted more than the files it replaces: it heals what went missing,
``scrub`` finds and repairs drift, ``migrate`` deletes nothing it has not verified, and a
broken bucket is an error, not an absence. Real Synapse, real SeaweedFS."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import (
    download,
    provider_entry,
    run_tool,
    s3_config,
    s3_legacy_entry,
    sha,
    switch_to_dedup,
    wipe_local_media,
)


def local_path(media_id: str) -> str:
    return f"local_content/{media_id[0:2]}/{media_id[2:4]}/{media_id[4:]}"


def blob_flags(hs: Synapse, data: bytes) -> list[tuple]:
    return hs.sql(
        "SELECT stored, corrupt FROM msc3916_storage_blobs WHERE sha256 = ?", (sha(data),)
    )


def test_missing_objects_heal_on_the_next_upload_and_scrub_finds_and_repairs_them(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "safety-heal"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    token = hs.register("alice")
    x, y, z, w = (os.urandom(n) for n in (120_000, 80_000, 60_000, 40_000))
    a1, b1, c1, d1 = (hs.upload(token, data) for data in (x, y, z, w))
    client = seaweedfs.client()
    for data in (x, y, z, w):  # an operator, a lifecycle rule, a lost race...
        client.delete_object(Bucket=bucket, Key=blob_name(sha(data)))
    assert seaweedfs.list_keys(bucket) == []

    # The next upload of z, with no read in between, checks its dedup hit and restores it.
    c2 = hs.upload(token, z)
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(z))]
    assert hs.metric_value("synapse_msc3916_storage_heals_total") == 1

    # A read that finds w missing marks it; the next upload of w rewrites it.
    wipe_local_media(hs)
    assert download(hs, token, d1).status == 404
    assert blob_flags(hs, w) == [(1, 1)]
    assert hs.metric_value(
        "synapse_msc3916_storage_damaged_objects_total", where="fetch", problem="missing"
    ) == 1
    d2 = hs.upload(token, w)
    assert blob_flags(hs, w) == [(1, 0)]
    assert hs.metric_value("synapse_msc3916_storage_heals_total") == 2

    # scrub reports x and y (their local copies were wiped above: put y's back).
    report = run_tool(hs, "scrub", "--json")
    assert report.returncode == 1, report.stderr
    found = json.loads(report.stdout)
    assert (found["checked"], found["ok"], found["missing"], found["corrupt"]) == (4, 2, 2, 0)
    assert found["repaired"] == 0
    assert {b["sha256"] for b in found["broken"]} == {sha(x), sha(y)}
    assert "scrub" in report.stderr  # the progress line
    (hs.media_store / local_path(b1)).parent.mkdir(parents=True, exist_ok=True)
    (hs.media_store / local_path(b1)).write_bytes(y)

    fixed = run_tool(hs, "scrub", "--repair", "--json")
    assert fixed.returncode == 1, fixed.stderr  # x has no local copy: still broken
    result = json.loads(fixed.stdout)
    assert (result["missing"], result["repaired"], result["still_broken"]) == (2, 1, 1)
    by_sha = {b["sha256"]: b for b in result["broken"]}
    assert by_sha[sha(y)]["repaired_from"] == local_path(b1)
    assert by_sha[sha(x)]["repaired_from"] is None
    assert client.get_object(Bucket=bucket, Key=blob_name(sha(y)))["Body"].read() == y
    assert blob_flags(hs, x) == [(1, 1)]  # marked: the next upload rewrites it

    a2 = hs.upload(token, x)
    wipe_local_media(hs)
    for media_id, data in ((a1, x), (a2, x), (b1, y), (c1, z), (c2, z), (d1, w), (d2, w)):
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data, media_id
    final = run_tool(hs, "scrub", "--hash", "--json")
    assert final.returncode == 0, final.stdout + final.stderr
    assert json.loads(final.stdout)["ok"] == 4


def test_scrub_on_the_file_backend_finds_missing_and_truncated_objects(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})]
    ).start()
    token = hs.register("alice")
    sizes_ = (50_000, 60_000, 70_000, 20_000, 30_000)
    gone, cut, fine, rowless, unstored = (os.urandom(n) for n in sizes_)
    ids = [hs.upload(token, data) for data in (gone, cut, fine, rowless, unstored)]
    (store / blob_name(sha(gone))).unlink()
    (store / blob_name(sha(cut))).write_bytes(cut[:1000])
    flipped = bytearray(fine)
    flipped[5] ^= 1
    (store / blob_name(sha(fine))).write_bytes(bytes(flipped))  # same size: only --hash sees it
    # What a deletion that lost a race with an upload leaves: paths, an object, no row.
    hs.sql("DELETE FROM msc3916_storage_blobs WHERE sha256 = ?", (sha(rowless),))
    # What a deletion that lost its mark to an upload left before issue 18: paths, an
    # object, and a row saying "not stored" (scrub did not see it then: KeyError 'unstored').
    hs.sql("UPDATE msc3916_storage_blobs SET stored = 0 WHERE sha256 = ?", (sha(unstored),))

    sizes = json.loads(run_tool(hs, "scrub", "--json").stdout)
    counts = ("ok", "missing", "corrupt", "unrecorded", "unstored")
    assert tuple(sizes[k] for k in counts) == (1, 1, 1, 1, 1)
    hashed = run_tool(hs, "scrub", "--hash", "--json")
    assert hashed.returncode == 1
    assert json.loads(hashed.stdout)["corrupt"] == 2
    # Synapse still has the local copies: --repair restores all five.
    repaired = run_tool(hs, "scrub", "--hash", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "5 repaired" in repaired.stdout
    for data in (gone, cut, fine, rowless, unstored):
        assert (store / blob_name(sha(data))).read_bytes() == data
    assert run_tool(hs, "scrub", "--hash").returncode == 0
    wipe_local_media(hs)
    for media_id, data in zip(ids, (gone, cut, fine, rowless, unstored), strict=True):
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data


def test_migrate_deletes_only_verified_sources(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "safety-migrate"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[s3_legacy_entry(seaweedfs, bucket, "legacy/")])
    hs.start()
    token = hs.register("alice")
    good, rotten, lost = os.urandom(100_000), os.urandom(70_000), os.urandom(50_000)
    ids = {
        name: hs.upload(token, data, "application/octet-stream", name)
        for name, data in (("good", good), ("rotten", rotten), ("lost", lost))
    }
    key = {name: "legacy/" + local_path(media_id) for name, media_id in ids.items()}
    client = seaweedfs.client()
    recorded = hs.sql(
        "SELECT sha256 FROM local_media_repository WHERE media_id = ?", (ids["rotten"],)
    )
    assert recorded == [(sha(rotten),)]  # Synapse >= 1.128 records it
    # Bit rot in the legacy bucket: same length, one byte differs from what Synapse recorded.
    tampered = bytearray(rotten)
    tampered[100] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key["rotten"], Body=bytes(tampered))

    switch_to_dedup(hs, seaweedfs, bucket)

    first = run_tool(hs, "migrate", "--from-legacy-prefix", "--keep-source", "--json")
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    assert (report["written"], report["hash_mismatch"], report["legacy_deleted"]) == (2, 1, 0)
    assert "Synapse recorded" in first.stderr
    blobs = seaweedfs.list_keys(bucket, "blobs/")
    assert sorted(blobs) == sorted("blobs/" + blob_name(sha(d)) for d in (good, lost))
    assert hs.sql("SELECT 1 FROM msc3916_storage_paths WHERE file_id = ?", (ids["rotten"],)) == []

    # An operator mistake removes a destination object; migrating again must not take
    # the source with it: the copy is restored from the source, which stays this run.
    client.delete_object(Bucket=bucket, Key="blobs/" + blob_name(sha(lost)))
    second = run_tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert second.returncode == 1, second.stderr  # the rotten one still
    report = json.loads(second.stdout)
    assert (report["already"], report["restored"], report["legacy_deleted"]) == (1, 1, 1)
    legacy_left = seaweedfs.list_keys(bucket, "legacy/")
    assert key["lost"] in legacy_left and key["rotten"] in legacy_left
    assert key["good"] not in legacy_left
    assert "blobs/" + blob_name(sha(lost)) in seaweedfs.list_keys(bucket, "blobs/")

    wipe_local_media(hs)
    for name, data in (("good", good), ("lost", lost)):
        resp = download(hs, token, ids[name])
        assert resp.status == 200 and resp.body == data, name

    # Now that the copy verifies, the next run lets the source go; the rotten one stays.
    third = run_tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert third.returncode == 1
    assert seaweedfs.list_keys(bucket, "legacy/") == [key["rotten"]]


def test_a_deleted_bucket_is_a_5xx_with_an_error_line_not_a_404(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "safety-gone"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    token = hs.register("alice")
    data = os.urandom(30_000)
    media_id = hs.upload(token, data)
    wipe_local_media(hs)
    client = seaweedfs.client()
    for k in seaweedfs.list_keys(bucket):
        client.delete_object(Bucket=bucket, Key=k)
    client.delete_bucket(Bucket=bucket)

    resp: Any = download(hs, token, media_id)
    assert 500 <= resp.status < 600, resp
    assert resp.json()["errcode"] == "M_UNKNOWN"
    errors = [line for line in hs.output().splitlines() if "ERROR" in line]
    assert any("fetch failed" in line and "NoSuchBucket" in line for line in errors), errors[-5:]
    # The index was not told the object is missing: the bucket is broken, not the object.
    assert blob_flags(hs, data) == [(1, 0)]
    # A new upload is an error too, never a 200 for bytes that went nowhere.
    upload = request(
        "POST",
        hs.base_url,
        "/_matrix/media/v3/upload?filename=x.bin",
        {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        os.urandom(20_000),
    )
    assert 500 <= upload.status < 600, upload
    scrub = run_tool(hs, "scrub", "--json")
    assert scrub.returncode == 1 and "safety-gone" in scrub.stderr, scrub.stderr


def test_an_upload_takes_over_the_mark_of_a_gc_that_died(
    synapse_factory: Callable[..., Synapse], tmp_path: Path
) -> None:
    """A gc killed between marking and deleting must delay uploads, not fail them."""
    store = tmp_path / "blobs"
    hs = synapse_factory(
        storage_providers=[provider_entry({"backend": "file", "directory": str(store)})]
    ).start()
    token = hs.register("alice")
    data = os.urandom(90_000)
    first = hs.upload(token, data)
    # What the dead gc left: a mark 40 s old (takeover at 45 s) and the object deleted.
    mark = int(time.time() * 1000) - 40_000
    hs.sql("UPDATE msc3916_storage_blobs SET deleting_ts = ? WHERE sha256 = ?", (mark, sha(data)))
    (store / blob_name(sha(data))).unlink()
    started = time.monotonic()
    second = hs.upload(token, data)  # waits for the mark to go stale, then takes it over
    print(f"upload behind a dead gc mark took {time.monotonic() - started:.1f}s")
    assert hs.sql(
        "SELECT deleting_ts, stored, corrupt FROM msc3916_storage_blobs WHERE sha256 = ?",
        (sha(data),),
    ) == [(None, 1, 0)]
    assert hs.metric_value("synapse_msc3916_storage_heals_total") == 1  # a takeover rewrite
    assert (store / blob_name(sha(data))).read_bytes() == data
    wipe_local_media(hs)
    for media_id in (first, second):
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data


STRANGER = ("stranger-key", "stranger-secret-key")


@pytest.fixture(scope="module")
def seaweedfs_with_identities(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS that checks credentials: the usual admin key, and a stranger who may
    only touch a bucket of its own (so our bucket answers it AccessDenied)."""
    directory = tmp_path_factory.mktemp("seaweedfs-auth")
    config = directory / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [
                            {"accessKey": SeaweedFS.ACCESS_KEY, "secretKey": SeaweedFS.SECRET_KEY}
                        ],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {
                        "name": "stranger",
                        "credentials": [{"accessKey": STRANGER[0], "secretKey": STRANGER[1]}],
                        "actions": ["Read:elsewhere", "Write:elsewhere", "List:elsewhere"],
                    },
                ]
            }
        )
    )
    server = SeaweedFS(directory)
    server.extra_args = [f"-s3.config={config}"]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_access_denied_is_a_5xx_with_an_error_line_not_a_404(
    synapse_factory: Callable[..., Synapse], seaweedfs_with_identities: SeaweedFS
) -> None:
    sw = seaweedfs_with_identities
    sw.create_bucket("safety-denied")
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(sw, "safety-denied"))])
    hs.start()
    token = hs.register("alice")
    data = os.urandom(30_000)
    media_id = hs.upload(token, data)
    hs.stop()
    hs.config["media_storage_providers"] = [
        provider_entry(
            s3_config(
                sw, "safety-denied", access_key_id=STRANGER[0], secret_access_key=STRANGER[1]
            )
        )
    ]
    hs.write_config()
    wipe_local_media(hs)
    hs.start()

    resp = download(hs, token, media_id)
    assert 500 <= resp.status < 600, resp
    errors = [line for line in hs.output().splitlines() if "ERROR" in line]
    assert any("fetch failed" in line and "AccessDenied" in line for line in errors), errors[-5:]
    assert blob_flags(hs, data) == [(1, 0)]  # not mistaken for a missing object
