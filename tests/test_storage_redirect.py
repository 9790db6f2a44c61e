"""Presigned redirects (issue 14): real Synapse, real SeaweedFS that checks signatures.

The harness's usual SeaweedFS runs without identities, so it serves anyone and never
checks a URL's signature or expiry; these tests run one with an S3 identity file, so that
"S3 refuses an expired URL" and "the URL alone is enough" are really tested.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from synapse_msc3916.config import RedirectConfig, StorageConfig
from synapse_msc3916.storage.blobstore import blob_name
from synapse_msc3916.storage.redirect import Served, SignedUrls, decide, request_kind
from tests.harness import TOPOLOGY, SeaweedFS, Synapse, make_synapse, request, wait_for
from tests.storage_helpers import (
    SignedSeaweedFS,
    noise_png,
    provider_entry,
    s3_config,
    sha,
    wipe_local_media,
)

# Every release of the supported range: the seam and both sides of federation.
pytestmark = pytest.mark.compat

BUCKET = "redirects"
MIN_SIZE = 1000  # small enough that a thumbnail redirects, big enough for a 100-byte file
NO_REDIRECT_UA = "NoRedirect/1.0"


def redirect_provider(s3: SeaweedFS, discover_region: bool = False, **redirect: Any) -> dict[str, Any]:
    block = {"enabled": True, "min_size": MIN_SIZE, "expires": 2,
             "exclude_user_agents": ["^NoRedirect/"], **redirect}
    config = s3_config(s3, BUCKET, prefix="r/", redirect=block)
    if discover_region:
        del config["region_name"]
    return provider_entry(config)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SignedSeaweedFS(tmp_path_factory.mktemp("signed-seaweedfs")).start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory, s3: SeaweedFS) -> Iterator[Synapse]:
    server = make_synapse(
        tmp_path_factory.mktemp("redirect-hs"), tls=True, name="a",
        # no region_name: the provider asks the bucket (test_bucket_region_is_discovered...)
        storage_providers=[redirect_provider(s3, discover_region=True)],
    ).start()
    try:
        yield server
    finally:
        server.stop()


def follow(location: str) -> tuple[int, dict[str, str], bytes]:
    """GET a Location the way a browser would after a cross-origin redirect: no token."""
    try:
        with urllib.request.urlopen(location, timeout=30) as resp:
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {}, e.read()


def client_path(hs: Synapse, kind: str, media_id: str, suffix: str = "") -> str:
    return f"/_matrix/client/v1/media/{kind}/{hs.server_name}/{media_id}{suffix}"


def assert_same_as_streamed(hs: Synapse, token: str, path: str, data: bytes | None) -> str:
    """307, and following it gives what Synapse streams when it does not redirect."""
    redirected = hs.get(path, token)
    assert redirected.status == 307, redirected
    location = redirected.header("Location")
    assert location and location.startswith(hs.config["media_storage_providers"][0]["config"]["endpoint_url"])
    assert redirected.body == b""
    assert "private" in (redirected.header("Cache-Control") or "")
    assert redirected.header("ETag") is None
    streamed = hs.get(path, token, **{"User-Agent": NO_REDIRECT_UA})
    assert streamed.status == 200, streamed
    assert streamed.header("Location") is None
    status, headers, body = follow(location)
    assert status == 200
    assert body == streamed.body
    if data is not None:
        assert body == data
    assert headers["content-type"] == streamed.header("Content-Type")
    assert headers["content-disposition"] == streamed.header("Content-Disposition")
    return location


def test_large_downloads_and_thumbnails_redirect(hs: Synapse) -> None:
    token = hs.register("alice")
    image = noise_png(1024, 700)
    text = b"a line of text\n" * (2 * 1024 * 1024 // 15 + 1)
    assert len(image) >= 2 * 1024 * 1024 and len(text) >= 2 * 1024 * 1024
    png_id = hs.upload(token, image, "image/png", "noise.png")
    text_id = hs.upload(token, text, "text/plain", "notes.txt")
    small_id = hs.upload(token, b"x" * 100, "text/plain", "small.txt")

    before = hs.metric_value("synapse_msc3916_storage_redirects_total", kind="download")
    assert_same_as_streamed(hs, token, client_path(hs, "download", png_id), image)
    assert_same_as_streamed(hs, token, client_path(hs, "download", text_id), text)
    # the {fileName} override, non-ASCII: RFC 5987 filename*, exactly as Synapse sends it
    name = urllib.parse.quote("Überblick €.txt")
    assert_same_as_streamed(hs, token, client_path(hs, "download", text_id, "/" + name), text)
    assert hs.metric_value("synapse_msc3916_storage_redirects_total", kind="download") == before + 3

    # A local copy does not prevent the offload, and its absence does not matter either.
    wipe_local_media(hs)
    assert_same_as_streamed(hs, token, client_path(hs, "download", png_id), image)

    thumb = client_path(hs, "thumbnail", png_id, "?width=320&height=240&method=scale")
    assert_same_as_streamed(hs, token, thumb, None)
    assert hs.metric_value("synapse_msc3916_storage_redirects_total", kind="thumbnail") >= 1

    # The unstable MSC3916 client path is the stable endpoint: it redirects too.
    unstable = f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{hs.server_name}/{png_id}"
    assert hs.get(unstable, token).status == 307

    # Below min_size: streamed as always.
    small = hs.get(client_path(hs, "download", small_id), token)
    assert small.status == 200 and small.body == b"x" * 100 and small.header("Location") is None

    # A client listed in exclude_user_agents is streamed.
    excluded = hs.get(client_path(hs, "download", png_id), token, **{"User-Agent": "NoRedirect/2"})
    assert excluded.status == 200 and excluded.body == image
    assert hs.metric_value("synapse_msc3916_storage_redirected_bytes_total") >= 3 * len(text)


def test_refused_requests_never_redirect(hs: Synapse) -> None:
    token = hs.register("bob")
    admin = hs.register("root", admin=True)
    data = os.urandom(2 * 1024 * 1024)
    media_id = hs.upload(token, data, "application/octet-stream", "blob.bin")
    path = client_path(hs, "download", media_id)
    assert hs.get(path, token).status == 307

    no_token = hs.get(path)
    assert no_token.status == 401 and no_token.header("Location") is None

    # Legacy paths: authenticated (frozen) media is 404 even when the client can follow.
    for legacy in (f"/_matrix/media/v3/download/{hs.server_name}/{media_id}",
                   f"/_matrix/media/v3/download/{hs.server_name}/{media_id}?allow_redirect=true",
                   f"/_matrix/client/r0/media/download/{hs.server_name}/{media_id}"):
        resp = hs.get(legacy, token)
        assert resp.status == 404 and resp.header("Location") is None, (legacy, resp)

    if TOPOLOGY == "workers":
        # The media admin API runs on the media workers, and Synapse 1.163 lets only a
        # writer of the quarantined_media_changes stream (by default the main process,
        # which has no media admin API here) quarantine: 500 AssertionError.
        pytest.skip("quarantine needs a quarantined_media_changes writer on the media workers")
    quarantine = request(
        "POST", hs.base_url, f"/_synapse/admin/v1/media/quarantine/{hs.server_name}/{media_id}",
        {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}, b"{}",
    )
    assert quarantine.status == 200, quarantine
    quarantined = hs.get(path, token)
    assert quarantined.status == 404 and quarantined.header("Location") is None


def test_head_is_answered_as_synapse_answers_it(hs: Synapse) -> None:
    """A HEAD is never redirected: a URL presigned for GET answers HEAD with 403 on S3.

    Before the fix (issue 18 item 5) the HEAD got the 307 (``assert head.status == 200``
    failed with 307), and following it gave SeaweedFS's 403 for the GET signature."""
    token = hs.register("heidi")
    image = noise_png(800, 700)
    assert len(image) >= MIN_SIZE
    media_id = hs.upload(token, image, "image/png", "head.png")
    wipe_local_media(hs)  # answered from the provider, as a redirect would have been
    thumb = "?width=320&height=240&method=scale"
    for path in (client_path(hs, "download", media_id),
                 client_path(hs, "download", media_id, "/other.png"),
                 client_path(hs, "thumbnail", media_id, thumb)):
        assert hs.get(path, token).status == 307  # a GET of the same media redirects
        streamed = hs.get(path, token, **{"User-Agent": NO_REDIRECT_UA})
        assert streamed.status == 200, streamed
        head = request("HEAD", hs.base_url, path, {"Authorization": f"Bearer {token}"})
        assert head.status == 200, (path, head)
        assert head.header("Location") is None and head.body == b""
        for name in ("Content-Type", "Content-Disposition", "Content-Length", "ETag",
                     "Cache-Control"):
            assert head.header(name) == streamed.header(name), (path, name)
        assert int(head.header("Content-Length") or 0) == len(streamed.body)


def test_urls_are_signed_off_the_reactor_thread(hs: Synapse) -> None:
    """botocore refreshes IAM-role/IRSA/SSO credentials with blocking HTTP inside presign:
    signing must run on the provider's pool, never on the reactor (issue 18 item 15).

    Before the fix every "presigned ... on thread" line named MainThread."""
    token = hs.register("ivan")
    media_id = hs.upload(token, os.urandom(1_100_000), "application/octet-stream")
    assert hs.get(client_path(hs, "download", media_id), token).status == 307
    threads = re.findall(r"presigned [0-9a-f]{64} on thread (\S+)", hs.log_file.read_text())
    assert threads, "no URL was signed"
    assert all("msc3916-storage" in t for t in threads), set(threads)


def test_urls_are_reused_then_expire(hs: Synapse) -> None:
    token = hs.register("carol")
    data = os.urandom(1_500_000)
    path = client_path(hs, "download", hs.upload(token, data, "application/octet-stream"))
    first = hs.get(path, token).header("Location")
    second = hs.get(path, token).header("Location")
    assert first and first == second  # within expires / 2: one URL, so caches hit
    assert follow(first)[2] == data
    time.sleep(3.2)  # expires: 2
    status, _, _ = follow(first)
    assert status == 403  # S3 refuses the old signature
    fresh = hs.get(path, token)
    assert fresh.status == 307 and fresh.header("Location") != first
    assert follow(fresh.header("Location") or "")[2] == data


def test_federation_peer_follows_the_location_part(
    hs: Synapse, tmp_path: Path
) -> None:
    token = hs.register("dave")
    data = os.urandom(2 * 1024 * 1024)
    media_id = hs.upload(token, data, "application/octet-stream", "fed.bin")
    before = hs.metric_value("synapse_msc3916_storage_redirects_total", kind="federation")

    b = make_synapse(tmp_path / "b", tls=True, name="b").start()
    try:
        # The raw answer: multipart/mixed whose second part is only a Location header.
        # A checks B's signature with B's key, which it fetches from B; a deployment of B
        # that has only just started may not answer that yet (401 "Failed to find any key").
        answers = []

        def a_answers_b() -> bool:
            answers.append(hs.federation_get(
                f"/_matrix/federation/v1/media/download/{media_id}", b.server_name, b.signing_key()
            ))
            return answers[-1].status != 401

        wait_for(a_answers_b, 60, "A fetching B's signing key")
        raw = answers[-1]
        assert raw.status == 200, raw
        boundary = (raw.header("Content-Type") or "").split("boundary=")[1].encode()
        parts = raw.body.split(b"--" + boundary)
        assert parts[1] == b"\r\nContent-Type: application/json\r\n\r\n{}\r\n"
        assert parts[2].startswith(b"\r\nLocation: http") and parts[3] == b"--\r\n"
        assert int(raw.header("Content-Length") or 0) == len(raw.body)
        location = parts[2].split(b"\r\n")[1][len(b"Location: "):].decode()
        assert follow(location)[2] == data

        bob = b.register("bob")
        resp = b.get(f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}", bob)
        assert resp.status == 200, resp
        assert resp.body == data
        assert resp.header("Content-Disposition") == "attachment; filename=fed.bin"
        assert "File download redirected" in b.log_file.read_text()
    finally:
        b.stop()
    assert hs.metric_value("synapse_msc3916_storage_redirects_total", kind="federation") == before + 2  # raw + B


def test_a_vanished_object_stops_redirecting_and_heals(hs: Synapse, s3: SeaweedFS) -> None:
    """The object behind an indexed medium disappears (a lifecycle rule, an operator):
    redirects to it stop within expires/2, the blob is marked missing, and the next upload
    of the same content rewrites it (issue 18 item 10).

    Before the fix the hook trusted the index: 307 to S3's 404 for ever (the wait_for
    below timed out)."""
    token = hs.register("victor")
    data = os.urandom(1_300_000)
    media_id = hs.upload(token, data, "application/octet-stream", "gone.bin")
    wipe_local_media(hs)
    path = client_path(hs, "download", media_id)
    first = hs.get(path, token)
    assert first.status == 307, first
    s3.client().delete_object(Bucket=BUCKET, Key="r/" + blob_name(sha(data)))
    assert follow(first.header("Location") or "")[0] == 404  # the redirect leads nowhere now

    wait_for(lambda: hs.get(path, token).status != 307, 30, "redirects to a vanished object to stop")
    gone = hs.get(path, token)
    assert gone.status == 404 and gone.json()["errcode"] == "M_NOT_FOUND", gone
    assert hs.sql(
        "SELECT corrupt FROM msc3916_storage_blobs WHERE sha256 = ?", (sha(data),)
    ) == [(1,)]

    again = hs.upload(token, data)  # the same content: the object is written again
    wipe_local_media(hs)
    for medium in (again, media_id):
        resp = hs.get(client_path(hs, "download", medium), token)
        assert resp.status == 307, resp
        assert follow(resp.header("Location") or "")[2] == data


def _refetch_stores_before_recording() -> bool:
    """Whether this Synapse records a re-fetched remote file's row only after the storage
    providers stored it (1.163 does; 1.140 recorded it inside the store, so the existing
    row aborted the store)."""
    import inspect

    from synapse.media.media_repository import MediaRepository

    return "_store_remote_media_with_cleanup" in inspect.getsource(
        MediaRepository._federation_download_remote_file
    )


def test_a_vanished_remote_object_is_fetched_again(
    hs: Synapse, s3: SeaweedFS, tmp_path: Path
) -> None:
    """Remote media whose object vanished from B's bucket: B's redirect check finds it
    missing, Synapse gets "no responder" and fetches the media from its origin again, which
    stores it again (issue 18 item 10). Before the fix B redirected to its own S3's 404
    for ever (the wait_for timed out)."""
    token = hs.register("wendy")
    data = os.urandom(1_400_000)
    media_id = hs.upload(token, data, "application/octet-stream", "remote.bin")
    b = make_synapse(tmp_path / "b", tls=True, name="b", storage_providers=[
        provider_entry(s3_config(s3, BUCKET, prefix="b/", redirect={
            "enabled": True, "min_size": MIN_SIZE, "expires": 2}))]).start()
    try:
        bob = b.register("bob", admin=True)
        path = f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}"
        first = b.get(path, bob)
        assert first.status == 307, first
        assert follow(first.header("Location") or "")[2] == data
        s3.client().delete_object(Bucket=BUCKET, Key="b/" + blob_name(sha(data)))
        wipe_local_media(b)  # no local copy either: only the origin has it now

        if not _refetch_stores_before_recording():
            # Before Synapse wrote a re-fetched file's row after storing it, the row of
            # the first copy makes the re-fetch fail before the storage providers see
            # the file: B answers 404 (never a redirect to the missing object) until
            # the copy is purged from its remote cache, which the next read refetches.
            # (once the presence check's cache, expires/2 = 1 s, has run out)
            wait_for(lambda: b.get(path, bob).status == 404, 30, "B to stop redirecting")
            purged = request(
                "POST", b.base_url,
                f"/_synapse/admin/v1/purge_media_cache?before_ts={int(time.time() * 1000) + 60_000}",
                headers={"Authorization": f"Bearer {bob}"}, body=b"{}",
            )
            assert purged.status == 200, purged

        def served_again() -> bool:
            resp = b.get(path, bob)
            return resp.status == 307 and follow(resp.header("Location") or "")[2] == data

        wait_for(served_again, 30, "B to fetch the vanished remote media again")
        assert "b/" + blob_name(sha(data)) in s3.list_keys(BUCKET, "b/")
    finally:
        b.stop()


def test_legacy_endpoints_redirect_only_when_asked(
    tmp_path: Path, s3: SeaweedFS
) -> None:
    """Unfrozen media (uploaded with enable_authenticated_media off): legacy paths serve it;
    they redirect only with allow_redirect=true (MSC3860); MSC1902 paths always stream."""
    hs = make_synapse(tmp_path / "legacy", storage_providers=[redirect_provider(s3)],
                      extra_config={"enable_authenticated_media": False}).start()
    try:
        token = hs.register("erin")
        data = os.urandom(1_200_000)
        media_id = hs.upload(token, data, "application/octet-stream", "old.bin")
        legacy = f"/_matrix/media/v3/download/{hs.server_name}/{media_id}"
        plain = hs.get(legacy)
        assert plain.status == 200 and plain.body == data
        asked = hs.get(legacy + "?allow_redirect=true")
        assert asked.status == 307, asked
        assert follow(asked.header("Location") or "")[2] == data
        for msc1902 in (f"/_matrix/client/r0/media/download/{hs.server_name}/{media_id}",
                        f"/_matrix/client/unstable/org.matrix.msc1902/media/download/"
                        f"{hs.server_name}/{media_id}?allow_redirect=true"):
            resp = hs.get(msc1902)
            assert resp.status == 200 and resp.body == data, (msc1902, resp)
    finally:
        hs.stop()


def test_bucket_region_is_discovered_when_not_configured(hs: Synapse) -> None:
    """URLs signed for the wrong region fail on AWS: without region_name (as in the ``hs``
    fixture), the provider asks the bucket at start-up (SeaweedFS answers
    GetBucketLocation with no constraint, which is us-east-1) and signs for it. Before the
    fix no region was asked for (the log line below was missing) and URLs were signed for
    whatever boto3 defaulted to."""
    assert "bucket redirects is in region us-east-1 (discovered" in hs.log_file.read_text()
    token = hs.register("rita")
    data = os.urandom(1_200_000)
    resp = hs.get(client_path(hs, "download", hs.upload(token, data)), token)
    assert resp.status == 307, resp
    assert "%2Fus-east-1%2Fs3%2Faws4_request" in (resp.header("Location") or "")  # its scope
    assert follow(resp.header("Location") or "")[2] == data


@pytest.mark.single_process  # generic_worker prints only "Failed to parse config for module"
def test_undiscoverable_region_refuses_to_start(tmp_path: Path, s3: SeaweedFS) -> None:
    """No region_name, redirects on, and the bucket cannot tell its region (here: it does
    not exist): one line naming region_name. Before the fix Synapse started (the test
    timed out waiting for it to exit)."""
    config = s3_config(s3, "no-such-bucket", redirect={"enabled": True})
    del config["region_name"]
    hs = make_synapse(tmp_path / "noregion", storage_providers=[provider_entry(config)])
    code, output = hs.start_expecting_failure()
    assert code != 0
    lines = [line for line in output.splitlines() if "synapse_msc3916: region_name:" in line]
    assert lines and "no-such-bucket" in lines[0], output[-3000:]


@pytest.mark.single_process  # generic_worker prints only "Failed to parse config for module"
def test_redirect_with_a_file_backend_refuses_to_start(tmp_path: Path) -> None:
    hs = make_synapse(tmp_path / "bad", storage_providers=[provider_entry({
        "backend": "file", "directory": str(tmp_path / "blobs"), "redirect": {"enabled": True},
    })])
    code, output = hs.start_expecting_failure()
    assert code != 0
    assert "synapse_msc3916: redirect.enabled:" in output


# --- pure logic ---


def _parse(**redirect: Any) -> StorageConfig:
    return StorageConfig.parse({"backend": "s3", "bucket": "media", "redirect": redirect})


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"backend": "s3", "bucket": "media", "sse_customer_key": "k" * 32,
          "redirect": {"enabled": True}}, "redirect.enabled"),
        ({"backend": "s3", "bucket": "media", "redirect": {"expires": 0}}, "redirect.expires"),
        ({"backend": "s3", "bucket": "media", "redirect": {"expires": 3601}}, "redirect.expires"),
        ({"backend": "s3", "bucket": "media", "redirect": {"exclude_user_agents": ["("]}},
         "redirect.exclude_user_agents"),
        ({"backend": "s3", "bucket": "media", "redirect": {"public_endpoint_url": "cdn"}},
         "redirect.public_endpoint_url"),
        ({"backend": "s3", "bucket": "media", "redirect": {"colour": 1}}, "redirect.colour"),
        ({"backend": "file", "directory": "/tmp/x", "redirect": {"enabled": True}},
         "redirect.enabled"),
    ],
)
def test_bad_redirect_config_names_the_key(block: dict[str, Any], key: str) -> None:
    from synapse.module_api.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        StorageConfig.parse(block)
    message = str(e.value)
    assert message.startswith(f"synapse_msc3916: {key}:") and "\n" not in message


def test_bucket_region_from_its_location_constraint() -> None:
    from synapse_msc3916.storage.blobstore import region_from_location

    # S3's GetBucketLocation: no constraint is us-east-1, and "EU" is an old eu-west-1.
    assert region_from_location(None) == "us-east-1"
    assert region_from_location("") == "us-east-1"
    assert region_from_location("EU") == "eu-west-1"
    assert region_from_location("eu-central-1") == "eu-central-1"


def test_region_name_is_optional_with_redirects() -> None:
    """Discovered at start-up when absent (see test_bucket_region_is_discovered...)."""
    assert _parse(enabled=True).region_name is None
    with_region = StorageConfig.parse({"backend": "s3", "bucket": "media",
                                       "region_name": "eu-west-3", "redirect": {"enabled": True}})
    assert with_region.region_name == "eu-west-3"
    from synapse.module_api.errors import ConfigError

    with pytest.raises(ConfigError, match="^synapse_msc3916: region_name:"):
        StorageConfig.parse({"backend": "s3", "bucket": "media", "region_name": 3})


def test_redirect_config_defaults() -> None:
    config = _parse().redirect
    assert config == RedirectConfig()
    assert (config.enabled, config.min_size, config.expires, config.federation) == (
        False, 1048576, 300, True)
    assert StorageConfig.parse({"backend": "file", "directory": "/tmp/x"}).redirect == config


def _served(uri: str, multipart: bool = False, agent: str | None = None) -> Served:
    return Served(uri.encode(), agent, multipart, "image/png", "inline")


def test_which_requests_redirect() -> None:
    config = _parse(enabled=True, exclude_user_agents=["^NoRedirect/"]).redirect
    cases = {
        "/_matrix/client/v1/media/download/s/m": "download",
        "/_matrix/client/v1/media/thumbnail/s/m?width=1": "thumbnail",
        "/_matrix/client/unstable/org.matrix.msc3916/media/download/s/m": "download",
        "/_matrix/media/v3/download/s/m": None,
        "/_matrix/media/v3/download/s/m?allow_redirect=true": "download",
        "/_matrix/media/r0/thumbnail/s/m?allow_redirect=true&width=3": "thumbnail",
        "/_matrix/media/v3/download/s/m?allow_redirect=false": None,
        # MSC1902 paths (rewritten by the router to the legacy endpoints) stream
        "/_matrix/client/r0/media/download/s/m?allow_redirect=true": None,
        "/_matrix/client/unstable/org.matrix.msc1902/media/download/s/m": None,
        "/_matrix/federation/v1/remote_media/download/s/m?allow_redirect=true": None,
    }
    for uri, kind in cases.items():
        assert request_kind(_served(uri), config) == kind, uri
    for uri in ("/_matrix/federation/v1/media/download/m",
                "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/thumbnail/m"):
        assert request_kind(_served(uri, multipart=True), config) == "federation"
    head = Served(b"/_matrix/client/v1/media/download/s/m", None, False, None, None, head=True)
    assert request_kind(head, config) is None
    off = _parse(enabled=True, federation=False).redirect
    assert request_kind(_served("/_matrix/federation/v1/media/download/m", True), off) is None

    async def sign(sha: str, ct: str | None, cd: str | None) -> str:
        return f"https://s3/{sha}?{ct}&{cd}"

    urls = SignedUrls(10, sign, clock=lambda: 0.0)
    path = "/_matrix/client/v1/media/download/s/m"
    assert _run(decide(_served(path), 10, "ab", config, urls)) is None
    got = _run(decide(_served(path), 1 << 20, "ab", config, urls))
    assert got is not None and got[1].url == "https://s3/ab?image/png&inline"
    assert _run(decide(_served(path, agent="NoRedirect/1"), 1 << 20, "ab", config, urls)) is None


def test_signed_urls_are_reused_for_half_their_life() -> None:
    now = [1000.0]
    signed: list[int] = []

    async def sign(sha: str, ct: str | None, cd: str | None) -> str:
        signed.append(1)
        return f"u{len(signed)}"

    urls = SignedUrls(300, sign, clock=lambda: now[0])
    first = _run(urls.get("a", "t", "d"))
    assert (first.url, first.max_age) == ("u1", 299)
    now[0] += 149
    again = _run(urls.get("a", "t", "d"))
    assert again.url == "u1" and again.max_age == 150
    assert _run(urls.get("a", "t", "attachment")).url == "u2"  # other headers, other URL
    now[0] += 1
    assert _run(urls.get("a", "t", "d")).url == "u3"  # half the validity gone: signed afresh


def _run(coro: Any) -> Any:
    """Drive a coroutine that never suspends (its awaits complete at once)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine suspended")


def test_presence_is_checked_once_per_ttl_and_absence_never_cached() -> None:
    from synapse_msc3916.storage.redirect import PresenceChecks

    now = [0.0]
    there = {"a": True}
    asked: list[str] = []

    async def check(sha: str, length: int) -> bool:
        asked.append(sha)
        return there.get(sha, False)

    presence = PresenceChecks(1.0, check, clock=lambda: now[0])
    assert _run(presence.present("a", 5)) and _run(presence.present("a", 5))
    assert asked == ["a"]  # the second read trusted the first answer
    there["a"] = False
    now[0] += 1.0
    assert not _run(presence.present("a", 5))  # the ttl is over: asked again, gone
    there["a"] = True  # healed by a store
    assert _run(presence.present("a", 5))
    assert asked == ["a", "a", "a"]  # a missing answer is not remembered
