"""The module on Synapse workers: PostgreSQL, Redis, a main process and two media workers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.harness import TOPOLOGY, request, xmatrix_header
from tests.harness_workers import Deployment
from tests.test_endpoints import png
from tests.test_freeze import assert_frozen, iso

# These start their own deployment; they run in the workers pass of `make test`.
pytestmark = pytest.mark.skipif(TOPOLOGY != "workers", reason="run with MSC3916_TOPOLOGY=workers")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = Deployment(tmp_path_factory.mktemp("workers"), media_workers=2).start()
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
