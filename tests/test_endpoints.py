"""Every MSC3916-unstable and MSC1902 path answers exactly like its stable twin."""

from __future__ import annotations

import io
import re
import urllib.parse
from collections.abc import Iterator

import pytest
import synapse
from PIL import Image

from synapse_msc3916.synapse_adapter.probes import _version_tuple
from tests.harness import Response, Synapse, make_synapse, request

SYNAPSE_VERSION = _version_tuple(synapse.__version__)

# The whole file is the "module paths vs stable answers" part of the compatibility suite.
pytestmark = pytest.mark.compat

IGNORED = {"date", "server"}


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(out, "PNG")
    return out.getvalue()


MEDIA = {
    "png": (png(), "image/png", "image.png"),
    "text": (b"hello synapse media\n", "text/plain", "hello.txt"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>', "image/svg+xml", "d.svg"),
    "unicode": (b"unicode name\n", "text/plain", "r\u00e9sum\u00e9 \u6587\u4ef6.txt"),
    "noname": (b"%PDF-1.4 no name", "application/pdf", None),
    "empty": (b"", "text/plain", "empty.txt"),
}


def normalise(resp: Response) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body with the per-response multipart boundary blanked."""
    body = resp.body
    headers = []
    ctype = resp.header("content-type") or ""
    boundary = re.search(r"boundary=([0-9a-f]+)", ctype)
    for k, v in resp.header_list:
        if k.lower() in IGNORED:
            continue
        if boundary:
            v = v.replace(boundary.group(1), "B")
        headers.append((k.lower(), v))
    if boundary:
        body = body.replace(boundary.group(1).encode(), b"B")
    return resp.status, sorted(headers), body


def assert_same(a: Response, b: Response, what: str) -> None:
    assert normalise(a) == normalise(b), what


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    # Legacy reads allowed, so that MSC1902's unauthenticated paths have something to match.
    server = make_synapse(
        tmp_path_factory.mktemp("endpoints"),
        extra_config={"enable_authenticated_media": False},
    ).start()
    server.token = server.register("alice")  # type: ignore[attr-defined]
    server.media = {  # type: ignore[attr-defined]
        name: server.upload(server.token, data, ctype, fname)  # type: ignore[attr-defined]
        for name, (data, ctype, fname) in MEDIA.items()
    }
    yield server
    server.stop()


@pytest.fixture(scope="module")
def frozen_hs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    """Synapse's own default: every new upload is authenticated-only."""
    server = make_synapse(tmp_path_factory.mktemp("endpoints-auth")).start()
    server.token = server.register("alice")  # type: ignore[attr-defined]
    server.media_id = server.upload(server.token, png(), "image/png", "a.png")  # type: ignore[attr-defined]
    yield server
    server.stop()


def get(hs: Synapse, path: str, token: str | None = None, **headers: str) -> Response:
    return hs.get(path, token, **headers)


@pytest.mark.parametrize("name", list(MEDIA))
def test_client_download_unstable_equals_stable(hs: Synapse, name: str) -> None:
    sn, mid, tok = hs.server_name, hs.media[name], hs.token  # type: ignore[attr-defined]
    stable = get(hs, f"/_matrix/client/v1/media/download/{sn}/{mid}", tok)
    assert stable.status == 200 and stable.body == MEDIA[name][0]
    unstable = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}", tok)
    assert_same(stable, unstable, name)
    for override in ("other name.bin", "\u00fcber.txt"):
        q = urllib.parse.quote(override)
        a = get(hs, f"/_matrix/client/v1/media/download/{sn}/{mid}/{q}", tok)
        b = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}/{q}", tok)
        assert_same(a, b, f"{name} {override}")
    # No token: the same 401.
    assert_same(
        get(hs, f"/_matrix/client/v1/media/download/{sn}/{mid}"),
        get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}"),
        "no token",
    )


def test_client_download_headers_and_etag(hs: Synapse) -> None:
    sn, mid, tok = hs.server_name, hs.media["svg"], hs.token  # type: ignore[attr-defined]
    r = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}", tok)
    assert r.header("content-disposition", ).startswith("attachment")
    assert r.header("cross-origin-resource-policy") == "cross-origin"
    assert "sandbox" in (r.header("content-security-policy") or "")
    r = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{hs.media['unicode']}", tok)  # type: ignore[attr-defined]
    assert "filename*=utf-8''" in r.header("content-disposition")
    # Synapse answers media with an ETag (and 304 to If-None-Match) from 1.127 on; the
    # module's paths do exactly what this release's stable path does, either way.
    etag = r.header("etag")
    path = f"download/{sn}/{hs.media['unicode']}"  # type: ignore[attr-defined]
    stable = get(hs, f"/_matrix/client/v1/media/{path}", tok)
    assert stable.header("etag") == etag
    assert (etag is not None) is (SYNAPSE_VERSION >= (1, 127)), (etag, synapse.__version__)
    conditional = {"If-None-Match": etag or '"anything"'}
    answers = [
        get(hs, f"{prefix}/{path}", tok, **conditional)
        for prefix in ("/_matrix/client/v1/media", "/_matrix/client/unstable/org.matrix.msc3916/media")
    ]
    assert_same(answers[0], answers[1], "If-None-Match")
    assert answers[0].status == (304 if etag else 200)


@pytest.mark.parametrize(
    "params",
    [
        "width=32&height=32",
        "width=32&height=32&method=crop",
        "width=800&height=600&method=scale",
        "width=16&height=16&animated=true",
        "width=32&height=32&timeout_ms=1000",
    ],
)
def test_client_thumbnail_unstable_equals_stable(hs: Synapse, params: str) -> None:
    sn, mid, tok = hs.server_name, hs.media["png"], hs.token  # type: ignore[attr-defined]
    stable = get(hs, f"/_matrix/client/v1/media/thumbnail/{sn}/{mid}?{params}", tok)
    assert stable.status == 200
    unstable = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/thumbnail/{sn}/{mid}?{params}", tok)
    assert_same(stable, unstable, params)


@pytest.mark.parametrize("version", ["r0", "unstable/org.matrix.msc1902"])
@pytest.mark.parametrize("name", list(MEDIA))
def test_msc1902_client_download_equals_legacy(hs: Synapse, version: str, name: str) -> None:
    sn, mid = hs.server_name, hs.media[name]  # type: ignore[attr-defined]
    legacy = get(hs, f"/_matrix/media/v3/download/{sn}/{mid}")
    assert legacy.status == 200 and legacy.body == MEDIA[name][0]
    assert_same(legacy, get(hs, f"/_matrix/client/{version}/media/download/{sn}/{mid}"), name)
    assert_same(
        get(hs, f"/_matrix/media/v3/download/{sn}/{mid}/x.bin"),
        get(hs, f"/_matrix/client/{version}/media/download/{sn}/{mid}/x.bin"),
        name,
    )
    if name == "png":
        q = "width=32&height=32&method=crop"
        assert_same(
            get(hs, f"/_matrix/media/v3/thumbnail/{sn}/{mid}?{q}"),
            get(hs, f"/_matrix/client/{version}/media/thumbnail/{sn}/{mid}?{q}"),
            "thumbnail",
        )


@pytest.mark.parametrize("version", ["r0", "unstable/org.matrix.msc1902"])
def test_msc1902_client_never_serves_what_legacy_refuses(frozen_hs: Synapse, version: str) -> None:
    sn, mid = frozen_hs.server_name, frozen_hs.media_id  # type: ignore[attr-defined]
    legacy = get(frozen_hs, f"/_matrix/media/v3/download/{sn}/{mid}")
    assert legacy.status == 404
    for path in (
        f"/_matrix/client/{version}/media/download/{sn}/{mid}",
        f"/_matrix/client/{version}/media/download/{sn}/{mid}/a.png",
        f"/_matrix/client/{version}/media/thumbnail/{sn}/{mid}?width=32&height=32",
    ):
        r = get(frozen_hs, path, frozen_hs.token)  # type: ignore[attr-defined]
        assert r.status == 404 and r.json()["errcode"] == "M_NOT_FOUND", path
    # The authenticated paths serve it.
    for path in (
        f"/_matrix/client/v1/media/download/{sn}/{mid}",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{mid}",
    ):
        assert get(frozen_hs, path, frozen_hs.token).status == 200  # type: ignore[attr-defined]


@pytest.mark.parametrize("version", ["r0", "unstable/org.matrix.msc1902"])
def test_msc1902_upload_config_preview(hs: Synapse, version: str) -> None:
    tok = hs.token  # type: ignore[attr-defined]
    r = request(
        "POST",
        hs.base_url,
        f"/_matrix/client/{version}/media/upload?filename=up.txt",
        {"Authorization": f"Bearer {tok}", "Content-Type": "text/plain"},
        b"uploaded via msc1902",
    )
    assert r.status == 200, r
    mxc = r.json()["content_uri"]
    mid = mxc.rsplit("/", 1)[1]
    r = get(hs, f"/_matrix/client/v1/media/download/{hs.server_name}/{mid}", tok)
    assert r.body == b"uploaded via msc1902"
    no_token = request("POST", hs.base_url, f"/_matrix/client/{version}/media/upload", {}, b"x")
    assert no_token.status == 401 and no_token.json()["errcode"] == "M_MISSING_TOKEN"
    assert_same(
        get(hs, "/_matrix/client/v1/media/config", tok),
        get(hs, f"/_matrix/client/{version}/media/config", tok),
        "config",
    )
    r = get(hs, f"/_matrix/client/{version}/media/config")
    assert r.status == 401 and r.json()["errcode"] == "M_MISSING_TOKEN"
    r = get(hs, f"/_matrix/client/{version}/media/config", "not-a-token")
    assert r.status == 401 and r.json()["errcode"] == "M_UNKNOWN_TOKEN"
    # preview_url: same answer as the stable endpoint for a URL it may not fetch.
    q = "url=" + urllib.parse.quote("http://127.0.0.1:1/")
    assert_same(
        get(hs, f"/_matrix/client/v1/media/preview_url?{q}", tok),
        get(hs, f"/_matrix/client/{version}/media/preview_url?{q}", tok),
        "preview_url",
    )


def test_guests(hs: Synapse) -> None:
    guest = hs.guest()
    sn, mid = hs.server_name, hs.media["png"]  # type: ignore[attr-defined]
    prefixes = ["/_matrix/client/unstable/org.matrix.msc3916/media", "/_matrix/client/r0/media"]
    for prefix in prefixes:
        assert get(hs, f"{prefix}/download/{sn}/{mid}", guest).status == 200
        assert get(hs, f"{prefix}/thumbnail/{sn}/{mid}?width=32&height=32", guest).status == 200
        for what in ("config", "preview_url?url=http%3A%2F%2Fexample.org%2F"):
            r = get(hs, f"{prefix}/{what}", guest)
            assert r.status == 403 and r.json()["errcode"] == "M_GUEST_ACCESS_FORBIDDEN", (prefix, what)


FEDERATION_DOWNLOAD_FORMS = [
    "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/{kind}/{mid}",
    "/_matrix/federation/unstable/org.matrix.msc3916/media/{kind}/{mid}",
    "/_matrix/federation/unstable/org.matrix.msc3916/media/{kind}/{sn}/{mid}",
]


@pytest.mark.parametrize("form", FEDERATION_DOWNLOAD_FORMS)
@pytest.mark.parametrize("name", list(MEDIA))
def test_federation_download_equals_stable(hs: Synapse, form: str, name: str) -> None:
    sn, mid, key = hs.server_name, hs.media[name], hs.signing_key()  # type: ignore[attr-defined]
    stable_path = f"/_matrix/federation/v1/media/download/{mid}"
    path = form.format(kind="download", sn=sn, mid=mid)
    unstable = hs.federation_get(path, sn, key)
    assert unstable.status == 200
    assert unstable.header("content-type").startswith("multipart/mixed")
    # A whole multipart body, zero-byte media included: JSON part, then the bytes.
    assert int(unstable.header("content-length")) == len(unstable.body)
    assert b"Content-Type: application/json\r\n\r\n{}\r\n" in unstable.body
    assert unstable.body.rstrip().endswith(b"--")
    if name != "empty":  # Synapse's own answer for an empty file is broken upstream
        assert_same(hs.federation_get(stable_path, sn, key), unstable, name)


@pytest.mark.parametrize("form", FEDERATION_DOWNLOAD_FORMS)
def test_federation_thumbnail_equals_stable(hs: Synapse, form: str) -> None:
    sn, mid, key = hs.server_name, hs.media["png"], hs.signing_key()  # type: ignore[attr-defined]
    q = "?width=32&height=32&method=scale"
    stable = hs.federation_get(f"/_matrix/federation/v1/media/thumbnail/{mid}{q}", sn, key)
    assert stable.status == 200
    unstable = hs.federation_get(form.format(kind="thumbnail", sn=sn, mid=mid) + q, sn, key)
    assert_same(stable, unstable, form)


def test_federation_origin_form_refuses_other_origins(hs: Synapse) -> None:
    sn, mid, key = hs.server_name, hs.media["text"], hs.signing_key()  # type: ignore[attr-defined]
    path = f"/_matrix/federation/unstable/org.matrix.msc3916/media/download/other.example/{mid}"
    r = hs.federation_get(path, sn, key)
    assert r.status == 404 and r.json()["errcode"] == "M_NOT_FOUND"
    assert request("GET", hs.base_url, path).status == 401


@pytest.mark.parametrize("version", ["v1", "unstable/org.matrix.msc1902"])
@pytest.mark.parametrize("name", list(MEDIA))
def test_msc1902_federation_remote_media_equals_legacy(hs: Synapse, version: str, name: str) -> None:
    sn, mid, key = hs.server_name, hs.media[name], hs.signing_key()  # type: ignore[attr-defined]
    legacy = get(hs, f"/_matrix/media/v3/download/{sn}/{mid}")
    signed = hs.federation_get(f"/_matrix/federation/{version}/remote_media/download/{sn}/{mid}", sn, key)
    assert_same(legacy, signed, name)
    unsigned = request("GET", hs.base_url, f"/_matrix/federation/{version}/remote_media/download/{sn}/{mid}")
    assert unsigned.status == 401 and unsigned.json()["errcode"] == "M_UNAUTHORIZED"
    other = hs.federation_get(
        f"/_matrix/federation/{version}/remote_media/download/other.example/{mid}", sn, key
    )
    assert other.status == 404 and other.json()["errcode"] == "M_NOT_FOUND"


def test_msc1902_federation_serves_authenticated_media(frozen_hs: Synapse) -> None:
    """Federation peers get every local media item, as on Synapse's stable endpoints."""
    sn, mid, key = frozen_hs.server_name, frozen_hs.media_id, frozen_hs.signing_key()  # type: ignore[attr-defined]
    r = frozen_hs.federation_get(f"/_matrix/federation/v1/remote_media/download/{sn}/{mid}", sn, key)
    assert r.status == 200 and r.header("content-type") == "image/png"
    r = frozen_hs.federation_get(
        f"/_matrix/federation/v1/remote_media/thumbnail/{sn}/{mid}?width=32&height=32", sn, key
    )
    assert r.status == 200 and r.header("content-type") == "image/png"
    # ...while the same legacy path without a signature is still refused.
    assert get(frozen_hs, f"/_matrix/media/v3/download/{sn}/{mid}").status == 404


def test_errors_match_stable(hs: Synapse) -> None:
    sn, tok = hs.server_name, hs.token  # type: ignore[attr-defined]
    r = request(
        "POST", hs.base_url, "/_matrix/media/v1/create", {"Authorization": f"Bearer {tok}"}, b""
    )
    pending = r.json()["content_uri"].rsplit("/", 1)[1]
    png_id = hs.media["png"]  # type: ignore[attr-defined]
    cases = [
        f"download/{sn}/doesnotexist",
        f"download/{sn}/{pending}?timeout_ms=0",
        f"thumbnail/{sn}/{png_id}?width=100000000&height=1",
        f"thumbnail/{sn}/{png_id}?width=-1&height=1",
        f"thumbnail/{sn}/{png_id}?width=abc&height=1",
        f"thumbnail/{sn}/{png_id}?width=32&height=32&method=sideways",
    ]
    for case in cases:
        stable = get(hs, f"/_matrix/client/v1/media/{case}", tok)
        unstable = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/{case}", tok)
        assert_same(stable, unstable, case)
        assert stable.status in (200, 400, 404, 504), case
        if stable.status != 200:
            assert "errcode" in stable.json()
    pend = get(hs, f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{sn}/{pending}?timeout_ms=0", tok)
    assert pend.status == 504 and pend.json()["errcode"] == "M_NOT_YET_UPLOADED"


HOSTILE_SEGMENTS = [
    ("not%20a%20server!", "abc"),
    ("a" * 300, "abc"),
    ("exa%2Fmple.org", "abc"),
    ("..", "abc"),
    ("{sn}", ".."),
    ("{sn}", "%2E%2E"),
    ("{sn}", "a%2Fb"),
    ("{sn}", "a%2fb"),
    ("{sn}", "x" * 256),
    ("{sn}", "%00"),
    ("{sn}", "%ff%fe"),
    ("{sn}", "abc.def"),
]


@pytest.mark.parametrize(("server", "media_id"), HOSTILE_SEGMENTS)
def test_hostile_ids_get_400_on_every_module_path(hs: Synapse, server: str, media_id: str) -> None:
    sn, tok, key = hs.server_name, hs.token, hs.signing_key()  # type: ignore[attr-defined]
    server = server.format(sn=sn)
    client_paths = [
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{server}/{media_id}",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{server}/{media_id}/f.txt",
        f"/_matrix/client/unstable/org.matrix.msc3916/media/thumbnail/{server}/{media_id}?width=1&height=1",
        f"/_matrix/client/r0/media/download/{server}/{media_id}",
        f"/_matrix/client/unstable/org.matrix.msc1902/media/thumbnail/{server}/{media_id}?width=1&height=1",
    ]
    for path in client_paths:
        r = get(hs, path, tok)
        assert r.status == 400 and r.json()["errcode"] == "M_INVALID_PARAM", (path, r)
    federation_paths = [
        f"/_matrix/federation/v1/remote_media/download/{server}/{media_id}",
        f"/_matrix/federation/unstable/org.matrix.msc3916/media/download/{server}/{media_id}",
    ]
    if server == sn:
        federation_paths.append(f"/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/{media_id}")
    for path in federation_paths:
        r = hs.federation_get(path, sn, key)
        assert r.status == 400 and r.json()["errcode"] == "M_INVALID_PARAM", (path, r)
