"""The module on Synapse workers: PostgreSQL, Redis, a main process and two media workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.harness import TOPOLOGY, SeaweedFS, request, wait_for, xmatrix_header
from tests.harness_workers import Deployment, Worker
from tests.test_endpoints import png
from tests.test_freeze import assert_frozen, iso

# These start their own deployment; they run in the workers pass of `make test`.
pytestmark = pytest.mark.skipif(TOPOLOGY != "workers", reason="run with MSC3916_TOPOLOGY=workers")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Synapse's own per-media flag off, as in test_freeze.py: the freeze test below checks
    # the dated decision, which Synapse's flag would otherwise pre-empt (the freeze is never
    # weaker than Synapse).
    d = Deployment(
        tmp_path_factory.mktemp("workers"), media_workers=2,
        extra_config={"enable_authenticated_media": False},
    ).start()
    yield d
    d.stop()


def test_media_workers_serve_module_paths(deployment: Deployment) -> None:
    main = deployment.main
    assert main is not None
    w1, w2 = deployment.workers
    token = main.register("alice")
    mid = w1.upload(token, png(), "image/png", "w.png")
    sn = main.server_name
    for worker in (w1, w2):
        for prefix in ("/_matrix/client/v1/media", "/_matrix/client/unstable/org.matrix.msc3916/media"):
            r = worker.get(f"{prefix}/download/{sn}/{mid}", token)
            assert r.status == 200 and r.body == png(), (worker.name, prefix, r)
        key = main.signing_key()
        path = f"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/{mid}"
        r = request("GET", worker.base_url, path, {"Authorization": xmatrix_header(key, sn, sn, "GET", path)})
        assert r.status == 200 and png() in r.body
    # The main process loads no media repository, so it routes nothing.
    r = main.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}", token)
    assert r.status == 404 and r.json()["errcode"] == "M_UNRECOGNIZED"
    r = main.get("/_matrix/client/versions")
    assert r.json()["unstable_features"]["org.matrix.msc3916"] is True


def test_freeze_decision_is_the_same_on_both_workers(deployment: Deployment) -> None:
    main = deployment.main
    assert main is not None
    token = main.register("bob")
    w1, w2 = deployment.workers
    old = w1.upload(token, png(10, 10), "image/png", "old.png")
    time.sleep(0.05)
    cutoff = int(time.time() * 1000)
    time.sleep(0.05)
    new = w2.upload(token, png(12, 12), "image/png", "new.png")
    main.config["modules"][0]["config"] = {"freeze": {"after": iso(cutoff)}}
    main.write_config()
    for worker in (w1, w2):
        worker.stop()
        worker.start()
    sn = main.server_name
    for worker in (w1, w2):
        assert worker.get(f"/_matrix/media/v3/download/{sn}/{old}").status == 200
        assert_frozen(worker.get(f"/_matrix/media/v3/download/{sn}/{new}"), worker.name)
        assert_frozen(worker.get(f"/_matrix/client/r0/media/download/{sn}/{new}"), worker.name)
        assert worker.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{new}", token).status == 200


# --- the dedup storage provider shared by several media workers -------------------

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from synapse_msc3916.storage.blobstore import blob_name  # noqa: E402
from tests.storage_helpers import provider_entry, s3_config, wipe_local_media  # noqa: E402

BUCKET = "workers-shared"


@pytest.fixture(scope="module")
def s3_deployment(tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS) -> Iterator[Deployment]:
    seaweedfs.create_bucket(BUCKET)
    d = Deployment(
        tmp_path_factory.mktemp("workers-s3"),
        media_workers=2,
        storage_providers=[provider_entry(s3_config(seaweedfs, BUCKET))],
    ).start()
    d.token = d.main.register("uploader")  # type: ignore[union-attr, attr-defined]
    yield d
    d.stop()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(worker: Worker, token: str, media_id: str):  # type: ignore[no-untyped-def]
    return worker.get(f"/_matrix/client/v1/media/download/{worker.server_name}/{media_id}", token)


def test_same_content_on_both_workers_at_once_is_one_object(s3_deployment: Deployment, seaweedfs: SeaweedFS) -> None:
    w1, w2 = s3_deployment.workers
    token = s3_deployment.token  # type: ignore[attr-defined]
    content = os.urandom(300_000)
    barrier = threading.Barrier(16)

    def upload(i: int) -> tuple[str, str]:
        worker = (w1, w2)[i % 2]
        barrier.wait()
        return worker.name, worker.upload(token, content, "application/octet-stream", f"same{i}.bin")

    with ThreadPoolExecutor(16) as pool:
        uploads = list(pool.map(upload, range(16)))
    assert {name for name, _ in uploads} == {"media1", "media2"}
    keys = seaweedfs.list_keys(BUCKET)
    assert keys.count(blob_name(_sha(content))) == 1
    # Each worker serves what the other stored, from the bucket (local copies wiped).
    wipe_local_media(s3_deployment.main)  # type: ignore[arg-type]
    for name, media_id in uploads:
        other = w2 if name == "media1" else w1
        r = _download(other, token, media_id)
        assert r.status == 200 and r.body == content, (name, media_id)


def test_killing_a_media_worker_mid_upload_loses_nothing_acknowledged(s3_deployment: Deployment) -> None:
    w1, w2 = s3_deployment.workers
    token = s3_deployment.token  # type: ignore[attr-defined]
    acknowledged = [(w1.upload(token, data, "application/octet-stream"), data)
                    for data in (os.urandom(50_000) for _ in range(5))]
    # An upload that is still streaming when its worker dies.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", w1.port, timeout=30)
    conn.putrequest("POST", "/_matrix/media/v3/upload?filename=big.bin")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(20_000_000))
    conn.endheaders()
    conn.send(os.urandom(2_000_000))
    w1.kill()
    conn.close()
    try:
        # The other worker keeps serving, from the bucket, what w1 acknowledged.
        wipe_local_media(s3_deployment.main)  # type: ignore[arg-type]
        for media_id, data in acknowledged:
            r = _download(w2, token, media_id)
            assert r.status == 200 and r.body == data
        fresh = os.urandom(10_000)
        assert _download(w2, token, w2.upload(token, fresh)).body == fresh
    finally:
        w1.start()
    for media_id, data in acknowledged:
        assert _download(w1, token, media_id).body == data


def test_gc_while_both_workers_take_uploads(s3_deployment: Deployment, seaweedfs: SeaweedFS) -> None:
    """``gc --grace 0h --apply`` three times while four clients upload through both
    workers, re-uploading contents whose media are being deleted: nothing acknowledged
    is lost, and gc really deleted objects during the run."""
    main = s3_deployment.main
    assert main is not None
    w1, w2 = s3_deployment.workers
    admin = main.register("gcadmin", admin=True)
    pool = [os.urandom(30_000 + i) for i in range(8)]

    def delete(worker: Worker, media_id: str) -> None:
        r = request("DELETE", worker.base_url, f"/_synapse/admin/v1/media/{main.server_name}/{media_id}",
                    {"Authorization": f"Bearer {admin}"})
        assert r.status == 200, r

    # Garbage from the start: every pooled content once uploaded and deleted.
    for data in pool:
        delete(w1, w1.upload(admin, data))
    stop = threading.Event()
    kept: list[tuple[str, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        worker = (w1, w2)[n % 2]
        rng = random.Random(n)
        try:
            while not stop.is_set():
                data = rng.choice(pool) if rng.random() < 0.7 else os.urandom(5_000)
                media_id = worker.upload(admin, data)
                if rng.random() < 0.3:
                    delete(worker, media_id)  # its content may become garbage again
                else:
                    with lock:
                        kept.append((media_id, data))
                time.sleep(0.2)  # a steady load, not a flood the final check cannot read back
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    deleted = 0
    started = time.monotonic()
    try:
        for _ in range(3):
            gc = subprocess.run(
                [sys.executable, "-m", "synapse_msc3916", "gc", "--grace", "0h", "--apply", "--json",
                 "-c", str(main.config_path)],
                env=main.env(), capture_output=True, text=True, timeout=120,
            )
            assert gc.returncode == 0, gc.stderr
            deleted += json.loads(gc.stdout)["objects_deleted"]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert errors == []
    print(f"gc deleted {deleted} objects while {len(kept)} kept uploads ran"
          f" ({time.monotonic() - started:.1f} s)")
    assert deleted > 0  # a race test that cannot race proves nothing
    assert len(kept) > 20
    wipe_local_media(main)  # type: ignore[arg-type]
    for media_id, data in kept:
        for worker in (w1, w2):
            r = _download(worker, admin, media_id)
            assert r.status == 200 and r.body == data, (worker.name, media_id)


def test_five_media_workers_starting_at_once_create_the_schema_once(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS
) -> None:
    """A fresh PostgreSQL database, five processes of the module starting together."""
    seaweedfs.create_bucket("workers-schema")
    d = Deployment(
        tmp_path_factory.mktemp("workers-schema"),
        media_workers=0,
        storage_providers=[provider_entry(s3_config(seaweedfs, "workers-schema"))],
    ).start()
    main = d.main
    assert main is not None
    workers = [Worker(main, f"media{i}", ["media"]) for i in range(1, 6)]
    try:
        d.workers = workers
        for w in workers:
            w.spawn()
        for w in workers:
            w.wait_ready(120)
        db = d.postgres
        wait_for(lambda: db.query("synapse", "SELECT COUNT(*) FROM msc3916_storage_schema")[0][0] == 1,
                 30, "schema")
        from synapse_msc3916.storage import index
        from synapse_msc3916.synapse_adapter import media_deletions

        assert db.query("synapse", "SELECT component, version FROM msc3916_storage_schema") == [
            ("dedup_storage", index.SCHEMA_VERSION)
        ]
        # One tombstone trigger per media table, whoever of the five created it.
        names = sorted(media_deletions.trigger_name(t) for t, *_ in media_deletions.MEDIA_TABLES)
        wait_for(lambda: sorted(r[0] for r in db.query(
            "synapse", "SELECT tgname FROM pg_trigger WHERE tgname LIKE %s", ("msc3916_tombstone%",))) == names,
            30, "deletion triggers")
        for w in workers:
            out = w.output()
            errors = [line for line in out.splitlines() if " - ERROR - " in line or "Traceback" in line]
            assert errors == [], (w.name, errors)
        token = main.register("schema")
        data = os.urandom(1000)
        media_id = workers[0].upload(token, data)
        assert _download(workers[4], token, media_id).body == data
    finally:
        d.stop()
