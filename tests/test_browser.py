"""Redirected media in a real browser (issue 19): headless Chromium, a web client on its
own origin with Element Web's service worker, Synapse + the provider + SeaweedFS.

curl-style tests follow a 307 with whatever headers they like; a browser does not. The
web client (tests/webclient/) renders legacy ``/_matrix/media/v3`` URLs and its service
worker re-issues them to ``/_matrix/client/v1/media`` with ``Authorization``, as Element
Web does; Synapse answers large media with a 307 to a presigned S3 URL on a third origin.
That redirect is *tainted* (cross-origin request, cross-origin redirect to another
origin): Chromium drops ``Authorization`` and sends ``Origin: null`` to S3, which must
answer ``Access-Control-Allow-Origin`` for it or the browser throws the bytes away.

S3 here is SeaweedFS behind a recording pass-through (tests/web_client.py), so the tests
see what reached S3, and SeaweedFS runs so that a bucket without CORS rules refuses
cross-origin reads as AWS S3 does (``AwsCorsSeaweedFS``). Playwright drives Debian's
``chromium`` (``.ci/run`` installs it); it never downloads a browser.

Runs once, in the single topology: what is tested is the browser against the redirect,
which the workers topology does not change.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import TOPOLOGY, SeaweedFS, Synapse, wait_for
from tests.storage_helpers import AwsCorsSeaweedFS, noise_png, provider_entry, run_tool, s3_config
from tests.web_client import RecordingProxy, StaticSite, cors_problem

pytestmark = pytest.mark.skipif(
    TOPOLOGY == "workers", reason="browser suite runs once, in the single topology"
)

BUCKET = "web"
MIN_SIZE = 100_000  # a 32x32 thumbnail and a 10 kB file stream; the rest redirects
CHROMIUM = os.environ.get("MSC3916_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

# The rule `synapse-msc3916 s3 cors --apply` adds (synapse_msc3916/storage/cors.py).
WORKING_RULE = {"AllowedOrigins": ["*"], "AllowedMethods": ["GET", "HEAD"], "AllowedHeaders": ["*"]}


def old_docs_rule(client_origin: str) -> dict[str, Any]:
    """What docs/storage.md told admins before: GET from the web client's origin only."""
    return {"AllowedOrigins": [client_origin], "AllowedMethods": ["GET"]}


def set_cors(s3: SeaweedFS, *rules: dict[str, Any]) -> None:
    client = s3.client()
    if rules:
        client.put_bucket_cors(Bucket=BUCKET, CORSConfiguration={"CORSRules": list(rules)})
    else:
        client.delete_bucket_cors(Bucket=BUCKET)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = AwsCorsSeaweedFS(tmp_path_factory.mktemp("browser-s3")).start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_proxy(s3: SeaweedFS) -> Iterator[RecordingProxy]:
    proxy = RecordingProxy(s3.endpoint_url).start()
    yield proxy
    proxy.stop()


def start_hs(directory: Path, s3: SeaweedFS, endpoint_url: str, **redirect: Any) -> Synapse:
    config = s3_config(s3, BUCKET, endpoint_url=endpoint_url, prefix="m/",
                       redirect={"enabled": True, "min_size": MIN_SIZE, **redirect})
    return Synapse(directory, name="web", storage_providers=[provider_entry(config)]).start()


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory, s3: SeaweedFS,
       s3_proxy: RecordingProxy) -> Iterator[Synapse]:
    """S3 reached through the recording proxy: it is the endpoint the 307s point to."""
    server = start_hs(tmp_path_factory.mktemp("browser-hs"), s3, s3_proxy.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site() -> Iterator[StaticSite]:
    server = StaticSite().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"no Chromium at {CHROMIUM}: apt-get install chromium"
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class WebClient:
    """One browser tab of the web client, its service worker in control."""

    def __init__(self, page: Any, hs: Synapse):
        self.page = page
        self.hs = hs

    def login(self, user: str) -> None:
        token = self.hs.register(user)
        self.page.evaluate(
            "([hs, user, token]) => login(hs, user, 'WEBDEVICE', token)",
            [self.hs.base_url, f"@{user}:{self.hs.server_name}", token],
        )
        self.token = token

    def url(self, kind: str, media_id: str, query: str = "") -> str:
        return f"{self.hs.base_url}/_matrix/media/v3/{kind}/{self.hs.server_name}/{media_id}{query}"

    def show_image(self, url: str) -> dict[str, Any]:
        return dict(self.page.evaluate("(url) => showImage(url)", url))

    def fetch_sha256(self, url: str) -> dict[str, Any]:
        return dict(self.page.evaluate("(url) => fetchSha256(url)", url))


def open_client(browser: Any, site: StaticSite, hs: Synapse) -> Iterator[WebClient]:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{site.origin}/index.html")
        assert page.evaluate("clientReady") is True
        yield WebClient(page, hs)
    finally:
        context.close()


@pytest.fixture
def client(browser: Any, site: StaticSite, hs: Synapse) -> Iterator[WebClient]:
    yield from open_client(browser, site, hs)


def test_bucket_cors_in_seaweedfs_behaves_as_in_aws(hs: Synapse, s3: SeaweedFS,
                                                    s3_proxy: RecordingProxy) -> None:
    """Without this, every browser test below would pass against any bucket rule."""
    token = hs.register("probe")
    media_id = hs.upload(token, os.urandom(MIN_SIZE), "application/octet-stream")
    location = hs.get(f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}",
                      token).header("Location")
    assert location and location.startswith(s3_proxy.url)

    def allow_origin(origin: str) -> str | None:
        request = urllib.request.Request(location or "", headers={"Origin": origin})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.headers.get("Access-Control-Allow-Origin")

    set_cors(s3)
    assert allow_origin("null") is None and allow_origin("http://localhost:1") is None
    set_cors(s3, old_docs_rule("http://localhost:1"))
    assert allow_origin("http://localhost:1") == "http://localhost:1"
    assert allow_origin("null") is None
    set_cors(s3, WORKING_RULE)
    assert allow_origin("null") in ("*", "null")


def test_web_client_displays_redirected_and_streamed_media(
    client: WebClient, hs: Synapse, s3: SeaweedFS, s3_proxy: RecordingProxy, site: StaticSite
) -> None:
    """With the bucket rule the old docs gave instead of WORKING_RULE, this failed with:
    image not shown {'loaded': False, ...}: CORS: after the homeserver's cross-origin
    redirect the browser sent Origin: null to S3 (tainted origin; ...) and S3 answered 200
    with Access-Control-Allow-Origin: None, so the browser refused the answer."""
    set_cors(s3, WORKING_RULE)
    client.login("alice")
    image = noise_png(1024, 700)
    assert len(image) >= 2 * 1024 * 1024
    data = os.urandom(2 * 1024 * 1024 + 17)
    small = os.urandom(10_000)
    image_id = hs.upload(client.token, image, "image/png", "noise.png")
    file_id = hs.upload(client.token, data, "application/octet-stream", "data.bin")
    small_id = hs.upload(client.token, small, "application/octet-stream", "small.bin")

    def followed(mark: int, expected: int) -> None:
        seen = s3_proxy.presigned_since(mark)
        assert len(seen) == expected, (expected, seen)
        for s in seen:  # the tainted request, as the Fetch standard has it
            assert (s.method, s.origin, s.authorization, s.status) == ("GET", "null", None, 200), s

    # A redirected >= 2 MiB image in an <img>.
    mark = len(s3_proxy.seen())
    shown = client.show_image(client.url("download", image_id))
    assert shown["loaded"] and shown["naturalWidth"] == 1024, (
        f"image not shown {shown}: {cors_problem(s3_proxy.seen()[mark:], site.origin)}")
    followed(mark, 1)

    # A redirected file, fetched by the page and checked there (crypto.subtle).
    mark = len(s3_proxy.seen())
    got = client.fetch_sha256(client.url("download", file_id))
    assert got.get("sha256") == hashlib.sha256(data).hexdigest(), (
        f"file not fetched {got}: {cors_problem(s3_proxy.seen()[mark:], site.origin)}")
    assert got["length"] == len(data) and got["redirected"] is True
    followed(mark, 1)

    # A redirected thumbnail (320x240 of noise: far above min_size) ...
    mark = len(s3_proxy.seen())
    thumb = client.show_image(client.url("thumbnail", image_id, "?width=320&height=240&method=scale"))
    assert thumb["loaded"] and thumb["naturalWidth"] == 320, (
        f"thumbnail not shown {thumb}: {cors_problem(s3_proxy.seen()[mark:], site.origin)}")
    followed(mark, 1)

    # ... and a streamed one (32x32, a few kB): Synapse sends it, S3 sees no browser.
    mark = len(s3_proxy.seen())
    thumb = client.show_image(client.url("thumbnail", image_id, "?width=32&height=32&method=crop"))
    assert thumb["loaded"] and thumb["naturalWidth"] == 32, thumb
    followed(mark, 0)

    # Small media below min_size: streamed.
    mark = len(s3_proxy.seen())
    got = client.fetch_sha256(client.url("download", small_id))
    assert got.get("sha256") == hashlib.sha256(small).hexdigest() and got["redirected"] is False, got
    followed(mark, 0)


def test_logged_out_client_gets_no_bytes(
    client: WebClient, hs: Synapse, s3: SeaweedFS, s3_proxy: RecordingProxy
) -> None:
    set_cors(s3, WORKING_RULE)
    token = hs.register("bob")
    image_id = hs.upload(token, noise_png(600, 400), "image/png", "private.png")
    mark = len(s3_proxy.seen())
    shown = client.show_image(client.url("download", image_id))
    assert not shown["loaded"] and shown["naturalWidth"] == 0, shown
    got = client.fetch_sha256(client.url("download", image_id))
    assert got.get("status") == 404 and got.get("sha256") is None, got  # the freeze's legacy 404
    assert s3_proxy.presigned_since(mark) == []


def test_old_docs_rule_refuses_the_browser(
    client: WebClient, hs: Synapse, s3: SeaweedFS, s3_proxy: RecordingProxy, site: StaticSite
) -> None:
    """The rule docs/storage.md gave (GET from the client's origin): the image is lost.

    Chromium reports net::ERR_FAILED; curl-style tests stay green with this rule, because
    they send no Origin at all.
    """
    set_cors(s3, old_docs_rule(site.origin))
    client.login("carol")
    image_id = hs.upload(client.token, noise_png(1024, 700), "image/png", "lost.png")
    mark = len(s3_proxy.seen())
    shown = client.show_image(client.url("download", image_id))
    assert not shown["loaded"], shown
    got = client.fetch_sha256(client.url("download", image_id))
    assert "Failed to fetch" in got.get("error", ""), got
    problem = cors_problem(s3_proxy.seen()[mark:], site.origin)
    assert "Origin: null" in problem and "tainted origin" in problem, problem
    # S3 served the bytes (200): it is the browser that refused them.
    assert {s.status for s in s3_proxy.presigned_since(mark)} == {200}


def test_cdn_form_displays_redirected_media(
    tmp_path: Path, browser: Any, site: StaticSite, s3: SeaweedFS
) -> None:
    """public_endpoint_url: the 307 points at a pass-through "CDN" in front of SeaweedFS."""
    set_cors(s3, WORKING_RULE)
    cdn = RecordingProxy(s3.endpoint_url).start()
    hs = start_hs(tmp_path / "cdn-hs", s3, s3.endpoint_url, public_endpoint_url=cdn.url)
    try:
        for client in open_client(browser, site, hs):
            client.login("dave")
            image_id = hs.upload(client.token, noise_png(1024, 700), "image/png", "cdn.png")
            shown = client.show_image(client.url("download", image_id))
            assert shown["loaded"] and shown["naturalWidth"] == 1024, (
                f"image not shown {shown}: {cors_problem(cdn.seen(), site.origin)}")
            seen = cdn.presigned_since(0)
            assert [(s.origin, s.authorization, s.status) for s in seen] == [("null", None, 200)]
            assert not [s for s in cdn.seen() if not s.presigned]  # the CDN only serves clients
        # CORS at a CDN is the CDN's business: no start-up check of the bucket's rules.
        assert "s3 cors" not in hs.log_file.read_text()
    finally:
        hs.stop()
        cdn.stop()


# --- `synapse-msc3916 s3 cors` and the start-up check, on the same servers -------------

UNRELATED_RULE = {"AllowedOrigins": ["https://uploads.example"], "AllowedMethods": ["PUT"],
                  "AllowedHeaders": ["Content-Type"]}


def cors_command(hs: Synapse, *args: str, subprocess: bool = False) -> tuple[int, Any, str]:
    """``synapse-msc3916 s3 cors -c <hs's homeserver.yaml>``: in a process of its own when
    asked, else in this one (the same code, without a Python start-up per call)."""
    if subprocess:
        result = run_tool(hs, "s3", "cors", *args)
        assert "Traceback" not in result.stderr, result.stderr
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        import contextlib
        import io

        from synapse_msc3916.cli import main

        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["s3", "cors", *args, "-c", str(hs.config_path)])
        out, err = stdout.getvalue(), stderr.getvalue()
    report = json.loads(out) if "--json" in args else None
    return code, report, out + err


def test_startup_warns_once_when_the_bucket_refuses_browsers(hs: Synapse) -> None:
    """The module's Synapse started on a bucket without CORS rules (before the fix: no
    warning at all, the first sign was a user's missing image)."""
    def warnings() -> list[str]:
        return [line for line in hs.log_file.read_text().splitlines()
                if "WARNING" in line and "synapse-msc3916 s3 cors" in line]

    wait_for(lambda: warnings(), 30, "the start-up CORS warning")
    assert len(warnings()) == 1
    assert "Origin: null" in warnings()[0] and "tainted origin" in warnings()[0]


def test_cors_command_reports_refusal(hs: Synapse, s3: SeaweedFS, site: StaticSite) -> None:
    """Before the command existed: `s3` was an invalid choice (exit 2)."""
    token = hs.register("erin")
    hs.upload(token, os.urandom(MIN_SIZE), "application/octet-stream")  # something to probe
    set_cors(s3)
    code, report, _ = cors_command(hs, "--json", subprocess=True)
    assert code == 1, report
    assert report["rules"] == [] and report["browsers_served"] is False
    assert report["probe"]["allow_origin"] is None and report["probe"]["status"] in (200, 206)
    assert report["rule_to_add"]["AllowedOrigins"] == ["*"]

    # The rule the old docs gave: the web client's origin only. Refused, and said why.
    set_cors(s3, old_docs_rule(site.origin))
    code, _, text = cors_command(hs)
    assert code == 1, text
    assert site.origin in text and "DO NOT allow a GET with Origin: null" in text
    assert "tainted origin" in text and "will be REFUSED" in text
    assert '"AllowedOrigins": ["*"]' in text


def test_cors_command_apply_keeps_other_rules_and_the_browser_displays(
    hs: Synapse, s3: SeaweedFS, s3_proxy: RecordingProxy, site: StaticSite, browser: Any
) -> None:
    set_cors(s3, UNRELATED_RULE)
    code, report, _ = cors_command(hs, "--apply", "--json")
    assert code == 0 and report["applied"] is True and report["browsers_served"] is True, report
    rules = s3.client().get_bucket_cors(Bucket=BUCKET)["CORSRules"]
    assert [r["AllowedOrigins"] for r in rules] == [["https://uploads.example"], ["*"]]
    assert rules[0]["AllowedMethods"] == ["PUT"] and sorted(rules[1]["AllowedMethods"]) == ["GET", "HEAD"]

    code, _, text = cors_command(hs)  # idempotent, and now says so
    assert code == 0 and "will be served" in text and "rule to add" not in text, text
    code, report, _ = cors_command(hs, "--apply", "--json")
    assert code == 0 and report["applied"] is False
    assert len(s3.client().get_bucket_cors(Bucket=BUCKET)["CORSRules"]) == 2

    for client in open_client(browser, site, hs):
        client.login("frank")
        image_id = hs.upload(client.token, noise_png(1024, 700), "image/png", "fixed.png")
        mark = len(s3_proxy.seen())
        shown = client.show_image(client.url("download", image_id))
        assert shown["loaded"] and shown["naturalWidth"] == 1024, (
            f"image not shown {shown}: {cors_problem(s3_proxy.seen()[mark:], site.origin)}")
        assert [s.origin for s in s3_proxy.presigned_since(mark)] == ["null"]


def test_cors_command_in_the_cdn_form_names_the_cdn(tmp_path: Path, s3: SeaweedFS) -> None:
    """public_endpoint_url: the probe goes through the CDN, and the report says CORS is its job."""
    cdn = RecordingProxy(s3.endpoint_url).start()
    try:
        config = s3_config(s3, BUCKET, prefix="m/", redirect={"enabled": True, "public_endpoint_url": cdn.url})
        hs = Synapse(tmp_path / "cdn-conf", storage_providers=[provider_entry(config)])  # not started
        set_cors(s3, old_docs_rule("https://app.example"))
        code, _, text = cors_command(hs)
        assert code == 1 and f"redirects point at {cdn.url}: CORS is that CDN's job" in text, text
        assert [s.origin for s in cdn.presigned_since(0)] == ["null"]  # the probe took the CDN
    finally:
        cdn.stop()


def test_cors_command_goes_by_what_answers(tmp_path: Path, seaweedfs: SeaweedFS) -> None:
    """The harness's usual SeaweedFS answers every origin by its global default: the rules
    say no, the probe says yes, and the probe is what browsers meet."""
    seaweedfs.create_bucket("plain-cors")
    sha = hashlib.sha256(b"probe").hexdigest()
    seaweedfs.client().put_object(Bucket="plain-cors", Key=f"m/{sha[:2]}/{sha[2:4]}/{sha}", Body=b"probe")
    config = s3_config(seaweedfs, "plain-cors", prefix="m/", redirect={"enabled": True})
    hs = Synapse(tmp_path / "plain-conf", storage_providers=[provider_entry(config)])  # not started
    code, report, _ = cors_command(hs, "--json")
    assert code == 0 and report["rules"] == [] and report["rules_serve_redirected_browsers"] is False
    assert report["probe"]["allow_origin"] in ("*", "null") and report["browsers_served"] is True
    code, _, text = cors_command(hs)
    assert code == 0 and "served although the rules do not allow it" in text, text


def test_startup_check_on_real_s3(s3: SeaweedFS, caplog: pytest.LogCaptureFixture) -> None:
    """The check the provider runs at start-up, on the module's bucket: a WARNING for no
    rule and for the old docs' rule, nothing once the rule browsers need is there."""
    from synapse_msc3916.config import StorageConfig
    from synapse_msc3916.storage import cors
    from synapse_msc3916.storage.blobstore import S3BlobStore

    store = S3BlobStore(StorageConfig.parse(s3_config(s3, BUCKET, prefix="m/")))
    for rules, warned in (([], True), ([old_docs_rule("https://app.example")], True),
                          ([UNRELATED_RULE, cors.RULE], False)):
        set_cors(s3, *rules)
        caplog.clear()
        with caplog.at_level("WARNING", logger="synapse_msc3916.storage.cors"):
            cors.startup_check(store)
        assert len(caplog.records) == (1 if warned else 0), (rules, caplog.records)


# --- pure logic ---


def test_cors_rule_evaluation() -> None:
    from synapse_msc3916.storage import cors

    assert cors.origin_matches("*", "null")
    assert cors.origin_matches("https://*.example", "https://app.example")
    assert not cors.origin_matches("https://*.example", "null")
    assert not cors.origin_matches("https://app.example", "null")
    assert cors.origin_matches("null", "null")
    assert not cors.serves_redirected_browsers([])
    assert not cors.serves_redirected_browsers([old_docs_rule("https://app.example")])
    assert not cors.serves_redirected_browsers([{"AllowedOrigins": ["*"], "AllowedMethods": ["PUT"]}])
    assert cors.serves_redirected_browsers([{"AllowedOrigins": ["*"], "AllowedMethods": ["get"]}])
    kept = [UNRELATED_RULE]
    assert cors.merged(kept) == [UNRELATED_RULE, cors.RULE]
    assert cors.merged([cors.RULE]) == [cors.RULE]


def test_startup_check_reports_an_unreadable_cors_without_failing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An S3 that refuses GetBucketCors (here: a client that raises AccessDenied)."""
    from botocore.exceptions import ClientError

    from synapse_msc3916.storage import cors

    class Refusing:
        def get_bucket_cors(self, Bucket: str) -> Any:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetBucketCors")

    class Store:
        bucket = "media"
        client = Refusing()

    with caplog.at_level("WARNING", logger="synapse_msc3916.storage.cors"):
        cors.startup_check(Store())
    assert len(caplog.records) == 1 and "AccessDenied" in caplog.records[0].getMessage()
