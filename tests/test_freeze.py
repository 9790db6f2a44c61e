"""The dated authenticated-only freeze, end to end through real homeservers.

These servers run with ``enable_authenticated_media: false``, so that Synapse's own
per-media flag refuses nothing and the date alone decides (the behaviour before issue 13).
How the freeze combines with that flag when it is on is in ``test_freeze_security.py``.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.conftest import start_federation_pair
from tests.harness import Response, Synapse, make_synapse, request
from tests.test_endpoints import png

# Synapse's enable_authenticated_media off: no media carries its `authenticated` flag.
NO_FLAG = {"enable_authenticated_media": False}


def iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).isoformat()


def legacy_paths(sn: str, mid: str) -> list[str]:
    paths = []
    for v in ("r0", "v1", "v3"):
        paths += [
            f"/_matrix/media/{v}/download/{sn}/{mid}",
            f"/_matrix/media/{v}/download/{sn}/{mid}/name.png",
            f"/_matrix/media/{v}/thumbnail/{sn}/{mid}?width=32&height=32",
        ]
    for v in ("r0", "unstable/org.matrix.msc1902"):
        paths += [
            f"/_matrix/client/{v}/media/download/{sn}/{mid}",
            f"/_matrix/client/{v}/media/download/{sn}/{mid}/name.png",
            f"/_matrix/client/{v}/media/thumbnail/{sn}/{mid}?width=32&height=32&method=crop",
        ]
    return paths


def reserve(hs: Synapse, token: str) -> str:
    """Reserve a media id with ``POST /_matrix/media/v1/create`` (MSC2246 async upload)."""
    r = request("POST", hs.base_url, "/_matrix/media/v1/create", {"Authorization": f"Bearer {token}"})
    assert r.status == 200, r
    return str(r.json()["content_uri"].rsplit("/", 1)[1])


def upload_to(hs: Synapse, token: str, media_id: str, data: bytes, content_type: str) -> Response:
    """Upload the content of a reserved media id."""
    return request(
        "PUT", hs.base_url, f"/_matrix/media/v3/upload/{hs.server_name}/{media_id}",
        {"Authorization": f"Bearer {token}", "Content-Type": content_type}, data,
    )


def authenticated_paths(sn: str, mid: str) -> list[str]:
    return [
        f"/_matrix/client/v1/media/download/{sn}/{mid}",
        f"/_matrix/client/v1/media/thumbnail/{sn}/{mid}?width=32&height=32",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/thumbnail/{sn}/{mid}?width=32&height=32",
    ]


def assert_frozen(resp, what: str) -> None:
    assert resp.status == 404, (what, resp)
    body = resp.json()
    assert body["errcode"] == "M_NOT_FOUND", what
    assert "authenticat" in body["error"], what


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    hs = make_synapse(tmp_path_factory.mktemp("freeze"), module_config={}, extra_config=NO_FLAG)
    hs.start()
    hs.token = hs.register("alice")  # type: ignore[attr-defined]
    hs.old = hs.upload(hs.token, png(), "image/png", "old.png")  # type: ignore[attr-defined]
    # Reserved before the date; one gets its content after it, one never does.
    hs.uploaded_late = reserve(hs, hs.token)  # type: ignore[attr-defined]
    hs.pending = reserve(hs, hs.token)  # type: ignore[attr-defined]
    time.sleep(0.05)
    hs.cutoff = int(time.time() * 1000)  # type: ignore[attr-defined]
    time.sleep(0.05)
    hs.new = hs.upload(hs.token, png(40, 40), "image/png", "new.png")  # type: ignore[attr-defined]
    r = upload_to(hs, hs.token, hs.uploaded_late, png(36, 36), "image/png")  # type: ignore[attr-defined]
    assert r.status == 200, r
    hs.config["modules"][0]["config"] = {"freeze": {"after": iso(hs.cutoff), "mode": "enforce"}}  # type: ignore[attr-defined]
    hs.restart()
    yield hs
    hs.stop()


@pytest.mark.compat
def test_old_media_public_new_media_frozen(frozen: Synapse) -> None:
    sn, tok = frozen.server_name, frozen.token  # type: ignore[attr-defined]
    before = frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="refused")
    for path in legacy_paths(sn, frozen.old):  # type: ignore[attr-defined]
        r = frozen.get(path)
        assert r.status == 200, (path, r)
        assert r.header("content-type") == "image/png"
    for path in legacy_paths(sn, frozen.new):  # type: ignore[attr-defined]
        assert_frozen(frozen.get(path), path)
        assert_frozen(frozen.get(path, tok), path + " (a token does not make a legacy path authenticated)")
    for mid in (frozen.old, frozen.new):  # type: ignore[attr-defined]
        for path in authenticated_paths(sn, mid):
            assert frozen.get(path, tok).status == 200, path
    after = frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="refused")
    assert after - before == 2 * len(legacy_paths(sn, frozen.new))  # type: ignore[attr-defined]
    assert frozen.metric_value("synapse_msc3916_media_requests_total", family="legacy", kind="download") > 0
    assert frozen.metric_value("synapse_msc3916_media_requests_total", family="msc1902", kind="thumbnail") > 0
    assert (
        frozen.metric_value("synapse_msc3916_media_requests_total", family="unstable_msc3916", kind="download")
        > 0
    )


def bypass_forms(sn: str, mid: str) -> list[tuple[str, str]]:
    upper = sn.replace(":", "%3A")
    lower = sn.replace(":", "%3a")
    escaped_id = "".join(f"%{ord(c):02X}" for c in mid)
    return [
        ("GET", f"/_matrix/media/v3/download/{upper}/{mid}"),
        ("GET", f"/_matrix/media/v3/download/{lower}/{mid}"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{escaped_id}"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{escaped_id.lower()}"),
        ("GET", f"/_matrix/media/v3/download/{sn}%2F{mid}"),
        ("GET", f"/_matrix/media/v3/download/{sn}%2f{mid}"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{mid}/"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{mid}//"),
        ("GET", f"/_matrix/media/v3/download//{sn}/{mid}"),
        ("GET", f"/_matrix/media//v3/download/{sn}/{mid}"),
        ("GET", f"//_matrix/media/v3/download/{sn}/{mid}"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{mid}?allow_redirect=true"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{mid}?allow_remote=false"),
        ("GET", f"/_matrix/media/v3/download/{sn}/{mid}?allow_remote=true&allow_redirect=true"),
        ("GET", f"/_matrix/media/r0/thumbnail/{upper}/{mid}?width=32&height=32"),
        ("GET", f"/_matrix/media/v3/thumbnail/{sn}/{mid}/?width=32&height=32"),
        ("HEAD", f"/_matrix/media/v3/download/{sn}/{mid}"),
        ("HEAD", f"/_matrix/media/v1/thumbnail/{sn}/{mid}?width=32&height=32"),
        ("GET", f"/_matrix/client/r0/media/download/{upper}/{mid}"),
        ("GET", f"/_matrix/client/r0/media/download/{sn}/{escaped_id}/x.png"),
        ("GET", f"/_matrix/client/r0//media/download/{sn}/{mid}"),
        ("GET", f"/_matrix/client/unstable/org.matrix.msc1902/media/download/{sn}/{mid}/"),
        ("HEAD", f"/_matrix/client/unstable/org.matrix.msc1902/media/thumbnail/{sn}/{mid}?width=32&height=32"),
    ]


@pytest.mark.compat
def test_bypass_forms_are_refused(frozen: Synapse) -> None:
    sn = frozen.server_name
    for method, path in bypass_forms(sn, frozen.new):  # type: ignore[attr-defined]
        r = request(method, frozen.base_url, path)
        assert r.status != 200 and r.status < 500, (method, path, r)
        assert b"PNG" not in r.body, (method, path)
    # The same forms do reach the old media (they are real spellings, not broken paths).
    served = [
        (m, p) for m, p in bypass_forms(sn, frozen.old)  # type: ignore[attr-defined]
        if request(m, frozen.base_url, p).status == 200
    ]
    assert len(served) >= 10, served


@pytest.mark.compat
def test_report_mode_serves_and_counts(frozen: Synapse) -> None:
    frozen.config["modules"][0]["config"]["freeze"]["mode"] = "report"
    frozen.restart()
    try:
        sn = frozen.server_name
        paths = legacy_paths(sn, frozen.new)  # type: ignore[attr-defined]
        before = frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="would_refuse")
        for path in paths:
            r = frozen.get(path)
            assert r.status == 200, (path, r)
        after = frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="would_refuse")
        assert after - before == len(paths)
        assert frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="refused") == 0
        # Logged at most once per media per hour by each process that serves media.
        log = frozen.log_file.read_text()
        processes = len(getattr(frozen, "workers", [])) or 1
        assert 1 <= log.count(f"would refuse mxc://{sn}/{frozen.new}") <= processes  # type: ignore[attr-defined]

        # Only reads that really served the media count as served/would_refuse (issue 18):
        # Synapse's own 404 for unknown media and its 400 for a thumbnail of a text file
        # return normally from the gated methods. Before the fix the first was counted as
        # `served` and the second as `would_refuse` (both metrics), not_served stayed 0.
        text = frozen.upload(frozen.token, b"no thumbnail\n", "text/plain", "t.txt")  # type: ignore[attr-defined]
        metric = "synapse_msc3916_unauthenticated_requests_total"
        counts = {d: frozen.metric_value(metric, decision=d) for d in ("served", "would_refuse", "not_served")}
        would = frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="would_refuse")
        assert frozen.get(f"/_matrix/media/v3/download/{sn}/NoSuchMedia").status == 404
        assert frozen.get(f"/_matrix/media/v3/thumbnail/{sn}/{text}?width=32&height=32").status == 400
        assert frozen.metric_value(metric, decision="served") == counts["served"]
        assert frozen.metric_value(metric, decision="would_refuse") == counts["would_refuse"]
        assert frozen.metric_value(metric, decision="not_served") == counts["not_served"] + 2
        assert frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="would_refuse") == would
        # The other tests count this fixture's media.
        frozen.sql("DELETE FROM local_media_repository WHERE media_id = ?", (text,))
    finally:
        frozen.config["modules"][0]["config"]["freeze"]["mode"] = "enforce"
        frozen.restart()


def test_exempt_media_stay_public(frozen: Synapse) -> None:
    sn = frozen.server_name
    frozen.config["modules"][0]["config"]["freeze"]["exempt"] = [f"mxc://{sn}/{frozen.new}"]  # type: ignore[attr-defined]
    frozen.restart()
    try:
        assert frozen.get(f"/_matrix/media/v3/download/{sn}/{frozen.new}").status == 200  # type: ignore[attr-defined]
        assert frozen.metric_value("synapse_msc3916_freeze_decisions_total", decision="exempt") >= 1
    finally:
        del frozen.config["modules"][0]["config"]["freeze"]["exempt"]
        frozen.restart()


@pytest.mark.compat
def test_reserved_media_judged_by_upload_time(frozen: Synapse) -> None:
    """Issue 18 item 3: an id reserved with /create before the date whose content came after.

    Before the fix every legacy path served it (200: judged by the reservation time,
    local_media_repository.created_ts), and a legacy read of a reservation without content
    waited for the upload (504 M_NOT_YET_UPLOADED once timeout_ms ran out).
    """
    sn, tok = frozen.server_name, frozen.token  # type: ignore[attr-defined]
    late = frozen.uploaded_late  # type: ignore[attr-defined]
    rows = frozen.sql("SELECT created_ts FROM local_media_repository WHERE media_id = ?", (late,))
    assert rows[0][0] < frozen.cutoff  # type: ignore[attr-defined]
    for path in legacy_paths(sn, late):
        assert_frozen(frozen.get(path), path)
    for path in authenticated_paths(sn, late):
        assert frozen.get(path, tok).status == 200, path
    # Content not there yet: it can only arrive now, after the date, so a legacy read is
    # refused at once rather than waiting for the upload and serving it.
    pending = frozen.pending  # type: ignore[attr-defined]
    assert_frozen(frozen.get(f"/_matrix/media/v3/download/{sn}/{pending}?timeout_ms=1000"), "pending")


def test_freeze_report_cli(frozen: Synapse) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", "freeze-report", "-c", str(frozen.config_path), "--json"],
        capture_output=True, text=True, check=True, cwd=frozen.dir, env=frozen.env(),
    )
    import json

    report = json.loads(out.stdout)
    # Media reserved before the date count by when their content arrived (one of them
    # after the date), and a reservation still without content is no media yet. Before
    # issue 18 item 3 the report counted both reservations as before the date (3 and 1).
    assert report["local"]["before"]["media"] == 1
    assert report["local"]["frozen"]["media"] == 2
    assert report["local"]["frozen"]["bytes"] == len(png(40, 40)) + len(png(36, 36))
    moved = subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", "freeze-report", "-c", str(frozen.config_path),
         "--after", "2000-01-01T00:00:00Z"],
        capture_output=True, text=True, check=True, env=frozen.env(),
    )
    assert "newly frozen" in moved.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", "freeze-report", "-c", str(frozen.config_path),
         "--after", "next tuesday"],
        capture_output=True, text=True, env=frozen.env(),
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_remote_media_frozen_by_first_cache_time(tmp_path_factory: pytest.TempPathFactory) -> None:
    a, b = start_federation_pair(
        tmp_path_factory.mktemp("freeze-fed"), module_config={}, extra_config=NO_FLAG
    )
    try:
        a_tok, b_tok = a.register("alice"), b.register("bob")
        cached_early = a.upload(a_tok, png(), "image/png", "early.png")
        never_cached = a.upload(a_tok, png(30, 30), "image/png", "late.png")
        r = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{cached_early}", b_tok)
        assert r.status == 200
        time.sleep(0.05)
        after_ms = int(time.time() * 1000)
        b.config["modules"][0]["config"] = {"freeze": {"after": iso(after_ms)}}
        b.restart()

        # Cached before the date: still public on B's legacy endpoints.
        assert b.get(f"/_matrix/media/v3/download/{a.server_name}/{cached_early}").status == 200
        # Not cached yet: refused before B asks A for anything.
        seen_before = a.log_file.read_text().count(never_cached)
        for path in legacy_paths(a.server_name, never_cached):
            assert_frozen(b.get(path), path)
        time.sleep(0.3)
        assert a.log_file.read_text().count(never_cached) == seen_before, "B contacted A for frozen media"
        # The authenticated path fetches and serves it; afterwards it stays frozen.
        r = b.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{a.server_name}/{never_cached}", b_tok)
        assert r.status == 200 and r.body == png(30, 30)
        assert a.log_file.read_text().count(never_cached) > seen_before
        assert_frozen(b.get(f"/_matrix/media/v3/download/{a.server_name}/{never_cached}"), "cached after")

        # Issue 18 item 2: B purges its copy of the early media and fetches it again after
        # the date: the new copy is judged by the new fetch, like Synapse's own flag is.
        # Before the fix B kept the first copy's time in memory and served it (200).
        admin = b.register("admin", admin=True)
        purge = request(
            "POST", b.base_url,
            f"/_synapse/admin/v1/purge_media_cache?before_ts={int(time.time() * 1000) + 60_000}",
            {"Authorization": f"Bearer {admin}"},
        )
        assert purge.status == 200 and purge.json()["deleted"] >= 1, purge
        where = "FROM remote_media_cache WHERE media_origin = ? AND media_id = ?"
        assert b.sql(f"SELECT 1 {where}", (a.server_name, cached_early)) == []
        r = b.get(f"/_matrix/client/v1/media/download/{a.server_name}/{cached_early}", b_tok)
        assert r.status == 200 and r.body == png()
        refetched = b.sql(f"SELECT created_ts {where}", (a.server_name, cached_early))[0][0]
        assert refetched >= after_ms
        for path in legacy_paths(a.server_name, cached_early):
            assert_frozen(b.get(path), path)
    finally:
        a.stop()
        b.stop()
