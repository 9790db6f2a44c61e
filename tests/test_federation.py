"""Two real homeservers federating over TLS on loopback, both running the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import signedjson.key

from tests.conftest import start_federation_pair
from tests.harness import Synapse, request, xmatrix_header
from tests.test_endpoints import png


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Synapse, Synapse]]:
    # Legacy reads allowed, so that MSC1902's unauthenticated client paths may fetch.
    a, b = start_federation_pair(
        tmp_path_factory.mktemp("fed"), extra_config={"enable_authenticated_media": False}
    )
    a.token = a.register("alice")  # type: ignore[attr-defined]
    b.token = b.register("bob")  # type: ignore[attr-defined]
    yield a, b
    a.stop()
    b.stop()


def access_log(hs: Synapse) -> str:
    return hs.log_file.read_text(errors="replace")


@pytest.mark.parametrize(
    "prefix",
    [
        "/_matrix/client/unstable/org.matrix.msc3916/media",
        "/_matrix/client/r0/media",
        "/_matrix/client/unstable/org.matrix.msc1902/media",
    ],
)
@pytest.mark.compat
def test_user_on_b_downloads_and_thumbnails_media_of_a(pair, prefix: str) -> None:
    a, b = pair
    image = png(80, 60)
    mid = a.upload(a.token, image, "image/png", "cat.png")
    r = b.get(f"{prefix}/download/{a.server_name}/{mid}", b.token)
    assert r.status == 200, r
    assert r.body == image and r.header("content-type") == "image/png"
    assert r.header("content-disposition") == "inline; filename=cat.png"
    r = b.get(f"{prefix}/thumbnail/{a.server_name}/{mid}?width=32&height=32&method=scale", b.token)
    assert r.status == 200 and r.header("content-type") == "image/png"
    if "msc3916" in prefix:
        # B fetched it the way Synapse's authenticated endpoints do: signed federation first.
        assert f"GET /_matrix/federation/v1/media/download/{mid}" in access_log(a)
    else:
        # MSC1902's client download/thumbnail are the legacy endpoints, unauthenticated (the
        # token is not checked): B fetched as Synapse's legacy endpoint does, never signed.
        assert f"GET /_matrix/media/v3/download/{a.server_name}/{mid}" in access_log(a)
        assert f"/_matrix/federation/v1/media/download/{mid}" not in access_log(a)


@pytest.mark.compat
def test_zero_byte_media_over_federation(pair) -> None:
    a, b = pair
    mid = a.upload(a.token, b"", "text/plain", "empty.txt")
    r = b.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{a.server_name}/{mid}", b.token)
    assert r.status == 200 and r.body == b""
    assert r.header("content-disposition") == "inline; filename=empty.txt"


FORMS = [
    "/_matrix/federation/v1/media/download/{mid}",  # Synapse's stable endpoint, the reference
    "/_matrix/federation/unstable/org.matrix.msc3916.v2/media/download/{mid}",
    "/_matrix/federation/unstable/org.matrix.msc3916/media/download/{mid}",
    "/_matrix/federation/unstable/org.matrix.msc3916/media/download/{a}/{mid}",
    "/_matrix/federation/v1/remote_media/download/{a}/{mid}",
    "/_matrix/federation/unstable/org.matrix.msc1902/remote_media/download/{a}/{mid}",
]


@pytest.mark.compat
def test_a_answers_requests_signed_by_b_and_refuses_bad_ones(pair) -> None:
    a, b = pair
    mid = a.upload(a.token, b"federated bytes\n", "text/plain", "f.txt")
    b_key = b.signing_key()
    outcomes: dict[str, list[tuple[int, str | None]]] = {}
    for form in FORMS:
        path = form.format(a=a.server_name, mid=mid)
        ok = a.federation_get(path, b.server_name, b_key)
        assert ok.status == 200, (form, ok)
        assert b"federated bytes\n" in ok.body

        forged = signedjson.key.generate_signing_key(b_key.version)  # right key id, wrong key
        unknown = signedjson.key.generate_signing_key("zz_unknown")
        bad = {
            "unsigned": request("GET", a.federation_url, path),
            "wrong signature": a.federation_get(path, b.server_name, forged),
            "unknown key": a.federation_get(path, b.server_name, unknown),
            "wrong destination": a.federation_get(path, b.server_name, b_key, destination="other.example"),
            "malformed": a.federation_get(path, b.server_name, b_key, authorization='X-Matrix origin=",,,'),
            "origin mismatch": request(
                "GET", a.federation_url, path,
                {"Authorization": xmatrix_header(b_key, "evil.example", a.server_name, "GET", path)},
            ),
        }
        outcomes[form] = [(r.status, r.json().get("errcode")) for r in bad.values()]
        for name, r in bad.items():
            assert r.status in (400, 401, 403), (form, name, r)
    reference = outcomes[FORMS[0]]
    for form, got in outcomes.items():
        assert got == reference, form
