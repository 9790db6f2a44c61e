"""The dedup provider on S3 (a real SeaweedFS) behind a real Synapse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from synapse_msc3916.storage.blobstore import blob_name
from tests.harness import SeaweedFS, Synapse, request
from tests.storage_helpers import (
    download,
    png,
    provider_entry,
    run_tool,
    s3_config,
    s3_legacy_entry,
    sha,
    switch_to_dedup,
    thumbnail,
    wipe_local_media,
)


def index_rows(hs: Synapse, where: str = "1=1", args: tuple = ()) -> list[tuple]:
    return hs.sql(f"SELECT path, sha256, length FROM msc3916_storage_paths WHERE {where}", args)


def test_same_bytes_from_different_users_is_one_object(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-users"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, prefix="m/"))]
    ).start()
    alice, bob = hs.register("alice"), hs.register("bob")
    data = os.urandom(2_500_000)  # several 1 MiB chunks
    a = hs.upload(alice, data, "application/octet-stream", "a.bin")
    b = hs.upload(bob, data, "text/plain", "notes.txt")
    assert seaweedfs.list_keys(bucket) == ["m/" + blob_name(sha(data))]

    # Identical images get identical thumbnails: stored once as well.
    image = png(400, 300)
    i1 = hs.upload(alice, image, "image/png", "one.png")
    i2 = hs.upload(bob, image, "image/png", "two.png")
    thumbs_1 = index_rows(hs, "file_id = ? AND thumbnail_width IS NOT NULL", (i1,))
    thumbs_2 = index_rows(hs, "file_id = ? AND thumbnail_width IS NOT NULL", (i2,))
    assert thumbs_1 and len(thumbs_1) == len(thumbs_2)
    distinct = {data, image} | set()
    expected = {sha(d) for d in distinct} | {r[1] for r in thumbs_1 + thumbs_2}
    keys = seaweedfs.list_keys(bucket)
    assert sorted(keys) == sorted("m/" + blob_name(s) for s in expected)
    assert hs.metric_value("synapse_msc3916_storage_dedup_hits_total") >= 1 + len(thumbs_2)

    wipe_local_media(hs)
    for token, media_id, ctype, name in (
        (alice, a, "application/octet-stream", "a.bin"),
        (bob, b, "text/plain", "notes.txt"),
        (alice, i1, "image/png", "one.png"),
        (bob, i2, "image/png", "two.png"),
    ):
        resp = download(hs, token, media_id)
        assert resp.status == 200, resp
        assert resp.body == (image if ctype == "image/png" else data)
        assert (resp.header("content-type") or "").startswith(ctype)
        assert name in (resp.header("content-disposition") or "")
        assert resp.header("content-length") == str(len(resp.body))
    thumb = thumbnail(hs, bob, i2)
    assert thumb.status == 200, thumb
    assert thumb.header("content-type") == "image/png"
    assert thumb.body.startswith(b"\x89PNG")


def test_concurrent_identical_uploads_make_one_object(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-concurrent"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    token = hs.register("alice")
    data = os.urandom(400_000)
    with ThreadPoolExecutor(12) as pool:
        ids = list(pool.map(lambda i: hs.upload(token, data, filename=f"f{i}"), range(24)))
    assert len(set(ids)) == 24
    assert seaweedfs.list_keys(bucket) == [blob_name(sha(data))]
    assert len(index_rows(hs, "sha256 = ?", (sha(data),))) == 24
    wipe_local_media(hs)
    for media_id in ids[:5]:
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == data


def test_legacy_bucket_served_then_migrated(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-legacy"
    seaweedfs.create_bucket(bucket)
    legacy = s3_legacy_entry(seaweedfs, bucket, "legacy/")
    hs = synapse_factory(storage_providers=[legacy])
    hs.start()
    token = hs.register("alice")
    same = os.urandom(150_000)
    contents = [same, same, same, os.urandom(90_000), b"small text file\n"]
    ids = [hs.upload(token, c, "application/octet-stream", f"f{i}") for i, c in enumerate(contents)]
    image = png(320, 240, (10, 120, 200))
    img_id = hs.upload(token, image, "image/png", "pic.png")
    legacy_keys = seaweedfs.list_keys(bucket, "legacy/")
    assert len(legacy_keys) > len(contents) + 1  # originals plus thumbnails
    client = seaweedfs.client()
    distinct = {
        sha(client.get_object(Bucket=bucket, Key=key)["Body"].read()) for key in legacy_keys
    }
    assert len(distinct) <= len(legacy_keys) - 2  # at least the three copies of `same`

    # Phase 2: the dedup provider replaces it, reading old objects via legacy_prefix.
    switch_to_dedup(hs, seaweedfs, bucket)
    assert "dedup storage provider on s3://dedup-legacy/blobs/" in hs.output()
    for media_id, content in zip(ids, contents, strict=True):
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == content
    assert thumbnail(hs, token, img_id).status == 200

    dry = run_tool(hs, "migrate", "--from-legacy-prefix", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len(seaweedfs.list_keys(bucket, "legacy/")) == len(legacy_keys)

    # One worker, so that the three copies of `same` are one write and two dedup hits in
    # any order (identical thumbnails of the image may add more). With several, copies of
    # one content migrated at the same moment may each write it, each verified: a
    # server-side copy racing the download of a duplicate, which overwrites the unverified
    # copy. One object per content either way, checked below.
    result = run_tool(hs, "migrate", "--from-legacy-prefix", "--jobs", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == len(legacy_keys)
    assert report["deduplicated"] >= 2, report
    assert "migrate: 100%" in result.stderr  # tqdm's progress line (stderr is not a TTY)
    assert seaweedfs.list_keys(bucket, "legacy/") == []
    blobs = seaweedfs.list_keys(bucket, "blobs/")
    assert sorted(blobs) == sorted("blobs/" + blob_name(d) for d in distinct)

    # Served from the dedup store now (legacy objects are gone).
    wipe_local_media(hs)
    for media_id, content in zip(ids, contents, strict=True):
        resp = download(hs, token, media_id)
        assert resp.status == 200 and resp.body == content
    assert thumbnail(hs, token, img_id).status == 200
    again = run_tool(hs, "migrate", "--from-legacy-prefix", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["files"] == 0

    stats = run_tool(hs, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    numbers = json.loads(stats.stdout)
    assert numbers["objects"] == len(blobs)
    assert numbers["logical_bytes"] > numbers["stored_bytes"]
    assert numbers["largest_duplicates"][0]["sha256"] == sha(same)
    assert numbers["largest_duplicates"][0]["paths"] == 3


def test_gc_after_admin_delete_removes_exactly_unreferenced_objects(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-gc"
    seaweedfs.create_bucket(bucket)
    # delete_after: null leaves deletions to gc, the subject here.
    hs = synapse_factory(
        storage_providers=[provider_entry(s3_config(seaweedfs, bucket, delete_after=None))]
    ).start()
    admin = hs.register("admin", admin=True)
    unique, shared, kept = os.urandom(50_000), os.urandom(60_000), os.urandom(70_000)
    u = hs.upload(admin, unique)
    s1 = hs.upload(admin, shared)
    s2 = hs.upload(admin, shared)
    k = hs.upload(admin, kept)
    assert len(seaweedfs.list_keys(bucket)) == 3
    # An image: deleting it must take its thumbnails' objects too.
    img = hs.upload(admin, png(300, 200, (1, 2, 3)), "image/png", "p.png")
    thumb_shas = {r[1] for r in index_rows(hs, "file_id = ?", (img,))}
    assert len(thumb_shas) >= 2  # the original and at least one thumbnail
    baseline = len(seaweedfs.list_keys(bucket))
    # A stray object nothing refers to (e.g. a crashed write long ago).
    stray = os.urandom(1000)
    seaweedfs.client().put_object(Bucket=bucket, Key=blob_name(sha(stray)), Body=stray)

    for media_id in (u, s1, img):
        resp = request(
            "DELETE",
            hs.base_url,
            f"/_synapse/admin/v1/media/{hs.server_name}/{media_id}",
            {"Authorization": f"Bearer {admin}"},
        )
        assert resp.status == 200, resp

    # Deleted media are known exactly (tombstones): their paths go at once, but within
    # the grace period no object goes.
    orphaned_paths = 2 + len(index_rows(hs, "file_id = ?", (img,)))
    young = run_tool(hs, "gc", "--apply", "--json")
    assert young.returncode == 0, young.stderr
    assert json.loads(young.stdout)["objects_deleted"] == 0
    assert json.loads(young.stdout)["paths_removed"] == orphaned_paths
    assert len(seaweedfs.list_keys(bucket)) == baseline + 1

    dry = run_tool(hs, "gc", "--grace", "0s", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["paths_removed"] == 0
    assert planned["objects_deleted"] == 1 + len(thumb_shas)
    assert planned["orphan_objects_deleted"] == 1
    assert len(seaweedfs.list_keys(bucket)) == baseline + 1

    done = run_tool(hs, "gc", "--grace", "0s", "--apply", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(report["deleted"]) == sorted([sha(unique), sha(stray), *thumb_shas])
    assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(d)) for d in (shared, kept))

    wipe_local_media(hs)
    for media_id, content in ((s2, shared), (k, kept)):
        resp = download(hs, admin, media_id)
        assert resp.status == 200 and resp.body == content
    assert download(hs, admin, u).status == 404

    # Content gc removed can come back: the object is written again.
    u2 = hs.upload(admin, unique)
    wipe_local_media(hs)
    assert download(hs, admin, u2).body == unique


def test_corrupt_object_is_detected_counted_and_not_served_again(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-corrupt"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    token = hs.register("alice")
    data = os.urandom(300_000)
    media_id = hs.upload(token, data)
    tampered = bytearray(data)
    tampered[1000] ^= 0xFF
    seaweedfs.client().put_object(Bucket=bucket, Key=blob_name(sha(data)), Body=bytes(tampered))
    wipe_local_media(hs)

    try:
        resp: Any = download(hs, token, media_id)
    except Exception as e:  # the connection is dropped rather than completed
        resp = e
    assert getattr(resp, "body", None) != bytes(tampered)
    assert getattr(resp, "body", None) != data
    assert hs.metric_value("synapse_msc3916_storage_corruptions_total") == 1
    assert download(hs, token, media_id).status == 404
    assert hs.sql(
        "SELECT corrupt FROM msc3916_storage_blobs WHERE sha256 = ?", (sha(data),)
    ) == [(1,)]
    # Uploading the content again repairs the object.
    again = hs.upload(token, data)
    wipe_local_media(hs)
    assert download(hs, token, again).body == data
    assert download(hs, token, media_id).body == data


def test_sse_c_storage_class_and_checksum_options_reach_s3(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    bucket = "dedup-ssec"
    seaweedfs.create_bucket(bucket)
    key = "k" * 32  # 32 bytes, as AES256 needs
    config = s3_config(
        seaweedfs,
        bucket,
        sse_customer_key=key,
        storage_class="STANDARD_IA",
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    hs = synapse_factory(storage_providers=[provider_entry(config)]).start()
    token = hs.register("alice")
    data = os.urandom(70_000)
    media_id = hs.upload(token, data)
    client = seaweedfs.client()
    name = blob_name(sha(data))
    try:
        client.get_object(Bucket=bucket, Key=name)
        raise AssertionError("an SSE-C object was readable without the key")
    except client.exceptions.ClientError:
        pass
    head = client.head_object(
        Bucket=bucket, Key=name, SSECustomerKey=key, SSECustomerAlgorithm="AES256"
    )
    assert head.get("StorageClass", "STANDARD_IA") == "STANDARD_IA"
    wipe_local_media(hs)
    assert download(hs, token, media_id).body == data


def test_gc_racing_uploads_of_the_same_content_loses_nothing(
    synapse_factory: Callable[..., Synapse], seaweedfs: SeaweedFS
) -> None:
    """A GC deleting content X while users upload X again: every upload stays readable.

    Each round starts the uploads at a different moment of the GC run, so that across
    rounds uploads land before the GC's scan, between scan and delete, and after it.
    """
    bucket = "dedup-gc-race"
    seaweedfs.create_bucket(bucket)
    hs = synapse_factory(storage_providers=[provider_entry(s3_config(seaweedfs, bucket))]).start()
    admin = hs.register("admin", admin=True)
    uploads: list[tuple[str, bytes]] = []
    contents = []
    deleted: list[str] = []
    for delay in (0.3, 0.7, 1.1):
        content = os.urandom(40_000)
        contents.append(content)
        first = hs.upload(admin, content)
        resp = request(
            "DELETE",
            hs.base_url,
            f"/_synapse/admin/v1/media/{hs.server_name}/{first}",
            {"Authorization": f"Bearer {admin}"},
        )
        assert resp.status == 200
        time.sleep(2.1)  # let the blob fall out of the 2 s grace period below
        gc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synapse_msc3916",
                "gc",
                "--grace",
                "2s",
                "--apply",
                "--json",
                "-c",
                str(hs.config_path),
            ],
            env=hs.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delay)
        while gc.poll() is None:
            uploads.append((hs.upload(admin, content), content))
            time.sleep(0.01)
        out, err = gc.communicate(timeout=60)
        assert gc.returncode == 0, err
        uploads.append((hs.upload(admin, content), content))
        deleted += json.loads(out)["deleted"]
    print(f"gc runs deleted {len(deleted)} of 3 contents while {len(uploads)} uploads ran")
    wipe_local_media(hs)
    for media_id, content in uploads:
        resp = download(hs, admin, media_id)
        assert resp.status == 200 and resp.body == content, media_id
    assert sorted(seaweedfs.list_keys(bucket)) == sorted(blob_name(sha(c)) for c in contents)
