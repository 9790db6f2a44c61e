"""Issue 6: signing-key tools (keys generate|combine|check|revoke) and their file formats."""

from __future__ import annotations

import ast
import base64
import http.server
import itertools
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_msc3916 import keys
from synapse_msc3916.cli import main
from synapse_msc3916.homeserver_config import ToolError
from synapse_msc3916.keys_cli import local_key_url
from tests.harness import REPO_ROOT, Synapse, free_port, request

SEED = bytes(range(32))
SEED_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # standard base64 of SEED


def public_b64(seed: bytes) -> str:
    """The public key computed by another ed25519 implementation (cryptography/OpenSSL)."""
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw
    )
    return base64.b64encode(raw).decode().rstrip("=")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "synapse_msc3916", "keys", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", list(itertools.product(keys.FORMATS, keys.FORMATS)))
def test_round_trip_every_format_pair(src: str, dst: str) -> None:
    originals = [keys.new_key(), keys.new_key("a_second")]
    fmt, parsed = keys.parse(keys.serialise(originals, src))
    assert fmt == src
    fmt, converted = keys.parse(keys.serialise(parsed, dst))
    assert fmt == dst
    assert converted == originals  # same versions and seeds, same order
    assert [k.public_base64() for k in converted] == [public_b64(k.seed) for k in originals]


@pytest.mark.parametrize(
    "src,dst", [("synapse", "mmr"), ("mmr", "dendrite"), ("dendrite", "synapse")]
)
def test_generate_converts_files_through_the_cli(
    tmp_path: Path, src: str, dst: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = tmp_path / f"first.{src}"
    assert main(["keys", "generate", "--format", src, "--output", str(first)]) == 0
    converted = tmp_path / f"converted.{dst}"
    assert main(["keys", "generate", "--input", str(first), "--format", dst,
                 "--output", str(converted)]) == 0
    (fmt_a, keys_a), (fmt_b, keys_b) = keys.read_key_file(str(first)), keys.read_key_file(
        str(converted)
    )
    assert (fmt_a, fmt_b) == (src, dst)
    assert keys_a == keys_b
    assert keys_a[0].key_id in capsys.readouterr().out


def test_new_key_has_a_fresh_alphanumeric_id(tmp_path: Path) -> None:
    ids = {keys.new_key().key_id for _ in range(20)}
    assert len(ids) == 20
    for key_id in ids:
        algorithm, version = key_id.split(":")
        assert algorithm == "ed25519" and version.isalnum() and len(version) == 8


def test_default_format_is_synapse(tmp_path: Path) -> None:
    out = tmp_path / "k"
    assert main(["keys", "generate", "--output", str(out)]) == 0
    line = out.read_text()
    algorithm, version, seed = line.split()
    assert line.count("\n") == 1 and algorithm == "ed25519" and "=" not in seed


def test_hand_written_mmr_fixture() -> None:
    text = (
        "-----BEGIN MMR PRIVATE KEY-----\n"
        "Key-ID: ed25519:mmrKey1\n"
        "Version: 1\n"
        "\n"
        f"{SEED_B64}\n"
        "-----END MMR PRIVATE KEY-----\n"
    )
    fmt, parsed = keys.parse(text)
    assert fmt == "mmr"
    assert [(k.key_id, k.seed) for k in parsed] == [("ed25519:mmrKey1", SEED)]
    assert parsed[0].public_base64() == public_b64(SEED)
    assert keys.serialise(parsed, "mmr") == text  # our writer produces the same bytes


def test_hand_written_dendrite_fixture_with_two_blocks_and_crlf() -> None:
    other = bytes(range(100, 132))
    text = (
        "-----BEGIN MATRIX PRIVATE KEY-----\r\n"
        "Key-ID: ed25519:auto\r\n"
        "\r\n"
        f"{SEED_B64}\r\n"
        "-----END MATRIX PRIVATE KEY-----\r\n"
        "\r\n"
        "-----BEGIN MATRIX PRIVATE KEY-----\r\n"
        "Key-ID: ed25519:second_1\r\n"
        "\r\n"
        f"{base64.b64encode(other).decode()}\r\n"
        "-----END MATRIX PRIVATE KEY-----\r\n"
    )
    fmt, parsed = keys.parse(text)
    assert fmt == "dendrite"
    assert [(k.key_id, k.seed) for k in parsed] == [
        ("ed25519:auto", SEED), ("ed25519:second_1", other)
    ]
    assert keys.serialise(parsed, "dendrite") == text.replace("\r\n", "\n").replace(
        "-----\n\n-----", "-----\n-----"
    )


def test_hand_written_synapse_fixture() -> None:
    text = f"ed25519 a_AbCd {SEED_B64.rstrip('=')}\n\ned25519 b_2 {public_b64(bytes(32))}\n"
    fmt, parsed = keys.parse(text)
    assert fmt == "synapse"
    assert [k.key_id for k in parsed] == ["ed25519:a_AbCd", "ed25519:b_2"]
    assert parsed[0].seed == SEED
    assert keys.serialise(parsed, "synapse") == text.replace("\n\n", "\n")


def test_64_byte_go_private_key_body_is_read_as_its_seed() -> None:
    public = base64.b64decode(public_b64(SEED) + "=")
    body = base64.b64encode(SEED + public).decode()
    text = f"-----BEGIN MMR PRIVATE KEY-----\nKey-ID: ed25519:x\nVersion: 1\n\n{body}\n" \
        "-----END MMR PRIVATE KEY-----\n"
    assert keys.parse(text)[1][0].seed == SEED
    bad = base64.b64encode(SEED + bytes(32)).decode()
    with pytest.raises(keys.KeyFormatError, match="not its public key"):
        keys.parse(text.replace(body, bad))


def test_mixed_pem_types_in_one_file() -> None:
    a, b = keys.new_key(), keys.new_key()
    fmt, parsed = keys.parse(keys.serialise([a], "mmr") + keys.serialise([b], "dendrite"))
    assert fmt == "mixed" and parsed == [a, b]


def test_key_repr_hides_the_seed() -> None:
    key = keys.Key("v", SEED)
    assert SEED_B64[:10] not in repr(key) and "ed25519:v" in repr(key)


def test_keys_modules_do_not_import_synapse() -> None:
    for name in ("keys.py", "keys_cli.py"):
        tree = ast.parse((REPO_ROOT / "synapse_msc3916" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                assert top not in ("synapse", "twisted"), (name, module)


# ---------------------------------------------------------------------------
# Malformed input: one line, exit 1, never a traceback
# ---------------------------------------------------------------------------

GOOD_LINE = f"ed25519 abc {SEED_B64.rstrip('=')}\n"
MMR_OK = f"-----BEGIN MMR PRIVATE KEY-----\nKey-ID: ed25519:m\nVersion: 1\n\n{SEED_B64}\n" \
    "-----END MMR PRIVATE KEY-----\n"

MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "no signing keys"),
    "blank lines only": (b"\n \n", "no signing keys"),
    "truncated base64": (f"ed25519 abc {SEED_B64[:30]}\n".encode(), "bytes, an ed25519 seed is 32"),
    "base64 cut to an impossible length": (f"ed25519 abc {SEED_B64[:29]}\n".encode(),
                                           "not valid base64"),
    "unknown algorithm": (GOOD_LINE.replace("ed25519", "ed448").encode(), "unknown key algorithm"),
    "two fields": (b"ed25519 abc\n", "expected 'ed25519 <version> <base64 key>'"),
    "bad version": (GOOD_LINE.replace("abc", "a-b").encode(), "key-id grammar"),
    "wrong PEM type": (MMR_OK.replace("MMR PRIVATE KEY", "RSA PRIVATE KEY").encode(),
                       "'RSA PRIVATE KEY' is not a Matrix signing key"),
    "PEM never closed": (MMR_OK.rsplit("-----END", 1)[0].encode(), "never closed"),
    "PEM end of another type": (MMR_OK.replace("END MMR", "END MATRIX").encode(),
                                "to close line 1"),
    "PEM truncated body": (MMR_OK.replace(SEED_B64, SEED_B64[:20]).encode(), "bytes, an ed25519"),
    "PEM bad base64": (MMR_OK.replace(SEED_B64, SEED_B64[:-2] + "!=").encode(), "not valid base64"),
    "PEM without Key-ID": (MMR_OK.replace("Key-ID: ed25519:m\n", "").encode(), "no Key-ID"),
    "PEM unknown algorithm": (MMR_OK.replace("ed25519:m", "rsa:m").encode(),
                              "unknown key algorithm"),
    "MMR without Version": (MMR_OK.replace("Version: 1\n", "").encode(), "no 'Version: 1'"),
    "MMR Version 2": (MMR_OK.replace("Version: 1", "Version: 2").encode(), "Version '2'"),
    "text around PEM": (b"hello\n" + MMR_OK.encode(), "text outside a PEM block"),
    "duplicate id": ((GOOD_LINE * 2).encode(), "ed25519:abc appears more than once"),
    "not UTF-8": (b"\xff\xfe\x00ed25519", "not UTF-8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_one_error_line(tmp_path: Path, case: str) -> None:
    content, expected = MALFORMED[case]
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    out = tmp_path / "out.key"
    result = run_cli("generate", "--input", str(bad), "--format", "mmr", "--output", str(out))
    line = assert_one_line_error(result, "synapse-msc3916 keys: error:", expected)
    assert SEED_B64[:16] not in line  # no key material in errors
    assert not out.exists()


@pytest.mark.parametrize("which", ["missing", "directory"])
def test_unreadable_input_is_one_error_line(tmp_path: Path, which: str) -> None:
    path = tmp_path / "nope" if which == "missing" else tmp_path
    result = run_cli("combine", "--format", "synapse", "--output", str(tmp_path / "o"), str(path))
    assert_one_line_error(result, f"cannot read {path}")


def test_combine_duplicate_key_id_is_an_error_naming_it(tmp_path: Path) -> None:
    a = tmp_path / "a.key"
    a.write_text(GOOD_LINE)
    b = tmp_path / "b.mmr"
    b.write_text(MMR_OK.replace("ed25519:m", "ed25519:abc"))
    result = run_cli("combine", "--format", "synapse", "--output", str(tmp_path / "o"),
                     str(a), str(b))
    assert_one_line_error(result, "duplicate key id ed25519:abc", str(a), str(b))
    assert not (tmp_path / "o").exists()


def test_unusable_config_is_one_error_line(tmp_path: Path) -> None:
    config = tmp_path / "homeserver.yaml"
    config.write_text("server_name: example.org\nsigning_key_path: /nonexistent/x.key\n")
    assert_one_line_error(run_cli("check", "-c", str(config)), "cannot read /nonexistent/x.key")
    config.write_text(": [\n")
    assert_one_line_error(run_cli("revoke", "-c", str(config), "--key-id", "x",
                                  "--output", str(tmp_path / "o")), "not valid YAML")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_only_raises_its_own_error_on_random_text(text: str) -> None:
    try:
        keys.parse(text)
    except keys.KeyFormatError as e:
        assert "\n" not in str(e)


PIECES = [
    "-----BEGIN MMR PRIVATE KEY-----", "-----END MMR PRIVATE KEY-----",
    "-----BEGIN MATRIX PRIVATE KEY-----", "-----END MATRIX PRIVATE KEY-----",
    "-----BEGIN ", "-----", "Key-ID: ed25519:a", "Key-ID: ed25519:", "Key-ID:", "Version: 1",
    "Version:", "", " ", "ed25519", "ed25519 a", SEED_B64, SEED_B64[:10], SEED_B64.rstrip("="),
    "====", "AAAA", ":", "\r", "\t", "ed25519 a " + SEED_B64,
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=5)), max_size=12))
def test_parser_only_raises_its_own_error_on_key_like_text(pieces: list[str]) -> None:
    try:
        keys.parse("\n".join(pieces))
    except keys.KeyFormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=32, max_size=32),
    st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True),
    st.sampled_from(keys.FORMATS),
)
def test_any_seed_and_version_round_trip(seed: bytes, version: str, fmt: str) -> None:
    key = keys.Key(version, seed)
    assert keys.parse(keys.serialise([key], fmt)) == (fmt, [key])


def test_tool_error_is_what_the_cli_reports() -> None:
    assert issubclass(keys.KeyFormatError, ToolError)


# ---------------------------------------------------------------------------
# Output files: 0600, never overwritten without --force
# ---------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_output_is_0600_and_force_is_needed_to_replace(tmp_path: Path) -> None:
    out = tmp_path / "k"
    old_umask = os.umask(0)
    try:
        assert main(["keys", "generate", "--output", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert mode(out) == 0o600
    before = out.read_text()

    result = run_cli("generate", "--output", str(out))
    assert_one_line_error(result, f"{out} already exists (use --force")
    assert out.read_text() == before

    out.chmod(0o644)
    assert run_cli("generate", "--output", str(out), "--force").returncode == 0
    assert out.read_text() != before
    assert mode(out) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temporary file left


def test_existing_symlink_is_not_followed_without_force(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_one_line_error(run_cli("generate", "--output", str(link)), "already exists")
    assert target.read_text() == "precious"


# ---------------------------------------------------------------------------
# Listener -> URL
# ---------------------------------------------------------------------------


def listener(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"port": 8008, "type": "http",
                               "resources": [{"names": ["client", "federation"]}]}
    base.update(kw)
    return base


def test_local_key_url_from_listeners() -> None:
    assert local_key_url({"listeners": [listener(bind_addresses=["127.0.0.1"])]}) == \
        "http://127.0.0.1:8008"
    assert local_key_url({"listeners": [listener()]}) == "http://127.0.0.1:8008"  # default binds
    assert local_key_url({"listeners": [listener(bind_addresses=["::1"], tls=True)]}) == \
        "https://[::1]:8008"
    client_only = listener(port=1, resources=[{"names": ["client"]}])
    public = listener(port=2, bind_addresses=["192.0.2.1"])
    metrics = {"port": 3, "type": "metrics", "bind_addresses": ["127.0.0.1"]}
    keys_only = listener(port=4, bind_addresses=["localhost"], resources=[{"names": ["keys"]}])
    assert local_key_url({"listeners": [client_only, public, metrics, keys_only]}) == \
        "http://127.0.0.1:4"
    assert local_key_url({"listeners": [client_only, public]}) is None
    assert local_key_url({}) is None


def test_check_without_a_usable_listener_asks_for_server_url(tmp_path: Path) -> None:
    key = tmp_path / "s.key"
    key.write_text(GOOD_LINE)
    config = tmp_path / "homeserver.yaml"
    config.write_text(yaml.safe_dump({
        "server_name": "example.org", "signing_key_path": str(key),
        "listeners": [listener(bind_addresses=["192.0.2.1"])],
    }))
    assert_one_line_error(run_cli("check", "-c", str(config)), "give --server-url")


# ---------------------------------------------------------------------------
# End to end with a real Synapse
# ---------------------------------------------------------------------------


def synapse_generated_key(path: Path) -> str:
    """A key written by Synapse's own generate_signing_key script; returns its key id."""
    subprocess.run(
        [sys.executable, "-m", "synapse._scripts.generate_signing_key", "-o", str(path)],
        check=True, timeout=60,
    )
    algorithm, version, _ = path.read_text().split()
    return f"{algorithm}:{version}"


def server_keys(server: Synapse) -> dict[str, Any]:
    resp = request("GET", server.base_url, "/_matrix/key/v2/server")
    assert resp.status == 200, resp
    data: dict[str, Any] = resp.json()
    return data


def test_end_to_end_add_check_and_revoke_a_media_key(
    tmp_path: Path, synapse_factory: Callable[..., Synapse]
) -> None:
    original = tmp_path / "existing.signing.key"
    original_id = synapse_generated_key(original)
    media = tmp_path / "media.signing.key"
    result = run_cli("generate", "--format", "mmr", "--output", str(media))
    assert result.returncode == 0, result.stderr
    (_, [media_key]) = keys.read_key_file(str(media))
    combined = tmp_path / "merged.signing.key"
    result = run_cli("combine", "--format", "synapse", "--output", str(combined),
                     str(original), str(media))
    assert result.returncode == 0, result.stderr
    assert combined.read_text().splitlines()[0].startswith(original_id.replace(":", " ") + " ")

    server = synapse_factory(signing_key_path=combined).start()
    published = server_keys(server)["verify_keys"]
    file_keys = keys.read_key_file(str(combined))[1]
    assert set(published) == {original_id, media_key.key_id}
    for key in file_keys:
        assert published[key.key_id] == {"key": public_b64(key.seed)}

    # check passes, naming the first key and both keys as published
    ok = run_cli("check", "-c", str(server.config_path), "--expect-first", original_id)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"first key (signs): {original_id}" in ok.stdout
    for key_id in (original_id, media_key.key_id):
        assert any(line.strip().startswith(f"{key_id}: published, valid_until_ts")
                   and "signature ok" in line for line in ok.stdout.splitlines()), ok.stdout
    assert "old_verify_keys: none" in ok.stdout

    # check fails with another expected first key
    wrong = run_cli("check", "-c", str(server.config_path), "--expect-first", media_key.key_id)
    assert_one_line_error(wrong, f"the first key is {original_id}, expected {media_key.key_id}")

    # check fails when the file has a key the server does not publish
    extra_key = keys.new_key()
    extra = tmp_path / "extra.signing.key"
    extra.write_text(keys.serialise(file_keys + [extra_key], "synapse"))
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(dict(server.config, signing_key_path=str(extra))))
    missing = run_cli("check", "-c", str(other_config), "--server-url", server.base_url)
    assert_one_line_error(missing, f"{extra_key.key_id} is not published")
    assert f"{extra_key.key_id}: MISSING from verify_keys" in missing.stdout

    # ... and when the server publishes a key the file lacks
    only_first = tmp_path / "first-only.key"
    only_first.write_text(keys.serialise(file_keys[:1], "synapse"))
    other_config.write_text(yaml.safe_dump(dict(server.config, signing_key_path=str(only_first))))
    stale = run_cli("check", "-c", str(other_config))
    assert_one_line_error(stale, f"{media_key.key_id} is published but not in the key file")

    # revoke the media key: new file without it, old_signing_keys entry on stdout
    revoked = tmp_path / "revoked.signing.key"
    rev = run_cli("revoke", "-c", str(server.config_path), "--key-id", media_key.key_id,
                  "--output", str(revoked))
    assert rev.returncode == 0, rev.stderr
    assert mode(revoked) == 0o600
    assert keys.read_key_file(str(revoked))[1] == file_keys[:1]
    entry = yaml.safe_load(rev.stdout)["old_signing_keys"]
    assert list(entry) == [media_key.key_id]
    assert entry[media_key.key_id]["key"] == public_b64(media_key.seed)
    assert isinstance(entry[media_key.key_id]["expired_ts"], int)

    server.config["signing_key_path"] = str(revoked)
    server.config["old_signing_keys"] = entry
    server.restart()
    after = server_keys(server)
    assert set(after["verify_keys"]) == {original_id}
    assert after["old_verify_keys"] == {
        media_key.key_id: {
            "key": public_b64(media_key.seed),
            "expired_ts": entry[media_key.key_id]["expired_ts"],
        }
    }
    ok = run_cli("check", "-c", str(server.config_path), "--expect-first", original_id)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"old_verify_keys:\n  {media_key.key_id}: expired_ts" in ok.stdout


def test_check_reports_an_unreachable_server_and_a_non_synapse_key_file(tmp_path: Path) -> None:
    key = tmp_path / "s.key"
    key.write_text(GOOD_LINE)
    config = tmp_path / "homeserver.yaml"
    closed = f"http://127.0.0.1:{free_port()}"
    config.write_text(yaml.safe_dump({"server_name": "example.org", "signing_key_path": str(key)}))
    assert_one_line_error(run_cli("check", "-c", str(config), "--server-url", closed),
                          f"GET {closed}/_matrix/key/v2/server failed")
    key.write_text(MMR_OK)
    assert_one_line_error(run_cli("check", "-c", str(config), "--server-url", closed),
                          "is a mmr key file; Synapse reads only its own format")


class FakeKeyServer:
    """A key server on loopback answering every GET with a fixed body."""

    def __init__(self, body: bytes, status: int = 200):
        outer = self
        self.body, self.status = body, status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    "body,status,expected",
    [
        (b"not json", 200, "did not return JSON"),
        (b"[]", 200, "no verify_keys"),
        (b'{"verify_keys": []}', 200, "no verify_keys"),
        (b"{}", 404, "answered HTTP 404"),
        (b'{"verify_keys": {}, "server_name": ["x"], "signatures": [1], "old_verify_keys": 2,'
         b' "valid_until_ts": "soon"}', 200, "no server_name string"),
        (b'{"verify_keys": {"ed25519:abc": "k"}, "server_name": "example.org",'
         b' "valid_until_ts": 99999999999999, "signatures": {"example.org": 5}}', 200,
         "ed25519:abc is not published"),
        (b'{"verify_keys": {"ed25519:abc": {"key": "AAAA"}}, "server_name": "example.org",'
         b' "valid_until_ts": 99999999999999}', 200, "published with a different public key"),
    ],
)
def test_check_survives_any_server_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: bytes, status: int, expected: str
) -> None:
    key = tmp_path / "s.key"
    key.write_text(GOOD_LINE)
    config = tmp_path / "homeserver.yaml"
    config.write_text(yaml.safe_dump({"server_name": "example.org", "signing_key_path": str(key)}))
    server = FakeKeyServer(body, status)
    try:
        assert main(["keys", "check", "-c", str(config), "--server-url", server.url]) == 1
    finally:
        server.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_check_of_an_unsigned_answer_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "s.key"
    key.write_text(GOOD_LINE)
    config = tmp_path / "homeserver.yaml"
    config.write_text(yaml.safe_dump({"server_name": "example.org", "signing_key_path": str(key)}))
    public = keys.parse(GOOD_LINE)[1][0].public_base64()
    answer = {"verify_keys": {"ed25519:abc": {"key": public}}, "server_name": "example.org",
              "valid_until_ts": 99999999999999, "old_verify_keys": {}}
    server = FakeKeyServer(json.dumps(answer).encode())
    try:
        assert main(["keys", "check", "-c", str(config), "--server-url", server.url]) == 1
    finally:
        server.close()
    out, err = capsys.readouterr()
    assert "ed25519:abc: published" in out and ", not signed" in out
    assert "not signed by the first key ed25519:abc" in err


def test_revoke_refuses_unknown_and_last_key(tmp_path: Path) -> None:
    key = tmp_path / "s.key"
    key.write_text(GOOD_LINE)
    config = tmp_path / "homeserver.yaml"
    config.write_text(yaml.safe_dump({"server_name": "example.org", "signing_key_path": str(key)}))
    out = str(tmp_path / "o")
    assert_one_line_error(run_cli("revoke", "-c", str(config), "--key-id", "zzz", "--output", out),
                          "ed25519:zzz is not in")
    assert_one_line_error(run_cli("revoke", "-c", str(config), "--key-id", "ed25519:abc",
                                  "--output", out), "the only key")
    assert not Path(out).exists()


def test_keys_does_not_import_its_command_line() -> None:
    """keys_cli imports keys, never the other way round (no import circle)."""
    import synapse_msc3916.keys as module

    tree = ast.parse(open(module.__file__).read())
    imported = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("keys_cli" in name for name in imported)
