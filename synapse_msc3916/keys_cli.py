"""``synapse-msc3916 keys generate|combine|check|revoke`` (issue 6).

The formats are in :mod:`synapse_msc3916.keys`; this file reads homeserver.yaml, talks to
the running homeserver's ``/_matrix/key/v2/server`` and prints reports. No Synapse import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import signedjson.sign

from synapse_msc3916 import homeserver_config
from synapse_msc3916.homeserver_config import ToolError
from synapse_msc3916.keys import (
    FORMATS,
    Key,
    KeyFormatError,
    new_key,
    normalise_key_id,
    parse,
    read_key_file,
    serialise,
    write_secret_file,
)

KEY_PATH = "/_matrix/key/v2/server"
FETCH_TIMEOUT = 15.0
LOOPBACK_V4 = {"127.0.0.1", "localhost", "0.0.0.0"}
LOOPBACK_V6 = {"::1", "::"}


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="generate, convert, combine, check and revoke signing keys",
        description="Ed25519 signing keys in Synapse, Dendrite and matrix-media-repo formats.",
    )
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")

    gen = sub.add_parser(
        "generate",
        help="a new key, or an existing key file converted to another format",
        description="Write a new ed25519 key with a random id, or with --input convert the "
        "keys of an existing file (format detected) to --format.",
    )
    gen.add_argument("--format", choices=FORMATS, default="synapse", help="default: synapse")
    gen.add_argument("--input", metavar="EXISTING", help="key file to convert instead")
    gen.add_argument("--output", required=True, metavar="FILE")
    gen.add_argument("--force", action="store_true", help="replace FILE if it exists")
    gen.set_defaults(func=cmd_generate)

    comb = sub.add_parser(
        "combine",
        help="all keys of several files, in order, in one file",
        description="Write every key of every input (formats detected), in input order. "
        "For Synapse, list its existing key file first: Synapse signs with the first key.",
    )
    comb.add_argument("--format", choices=FORMATS, required=True)
    comb.add_argument("--output", required=True, metavar="FILE")
    comb.add_argument("--force", action="store_true", help="replace FILE if it exists")
    comb.add_argument("inputs", nargs="+", metavar="INPUT")
    comb.set_defaults(func=cmd_combine)

    check = sub.add_parser(
        "check",
        help="compare signing_key_path with what the running homeserver publishes",
        description="Fetch /_matrix/key/v2/server and report each key of the homeserver's "
        "signing key file as published or missing; exit 1 on any problem.",
    )
    check.add_argument("-c", "--config", required=True, metavar="homeserver.yaml")
    check.add_argument(
        "--server-url",
        metavar="URL",
        help="base URL serving /_matrix/key/v2/server (default: the config's first "
        "loopback http listener with the federation or keys resource)",
    )
    check.add_argument(
        "--expect-first",
        metavar="KEY_ID",
        help="fail unless this is the first key of the file (the one Synapse signs with)",
    )
    check.set_defaults(func=cmd_check)

    rev = sub.add_parser(
        "revoke",
        help="write the key file without one key; print its old_signing_keys entry",
        description="Write the homeserver's key file without --key-id to --output and print "
        "the old_signing_keys entry to add to homeserver.yaml.",
    )
    rev.add_argument("-c", "--config", required=True, metavar="homeserver.yaml")
    rev.add_argument("--key-id", required=True, metavar="ID")
    rev.add_argument("--output", required=True, metavar="FILE")
    rev.add_argument("--force", action="store_true", help="replace FILE if it exists")
    rev.set_defaults(func=cmd_revoke)


def _ids(keys: list[Key]) -> str:
    return ", ".join(key.key_id for key in keys)


def _count(keys: list[Key]) -> str:
    return f"{len(keys)} key" if len(keys) == 1 else f"{len(keys)} keys"


# ---------------------------------------------------------------------------
# generate / combine
# ---------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    if args.input is not None:
        source_format, keys = read_key_file(args.input)
        what = f"converted {source_format} -> {args.format}"
    else:
        keys, what = [new_key()], f"new {args.format} key"
    write_secret_file(args.output, serialise(keys, args.format), args.force)
    print(f"{args.output}: {what}: {_ids(keys)}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    keys: list[Key] = []
    source_of: dict[str, str] = {}
    for path in args.inputs:
        for key in read_key_file(path)[1]:
            if key.key_id in source_of:
                raise KeyFormatError(
                    f"duplicate key id {key.key_id}: in {source_of[key.key_id]} and in {path}"
                )
            source_of[key.key_id] = path
            keys.append(key)
    write_secret_file(args.output, serialise(keys, args.format), args.force)
    print(f"{args.output}: {_count(keys)} ({args.format}), first {keys[0].key_id}: {_ids(keys)}")
    return 0


# ---------------------------------------------------------------------------
# homeserver.yaml
# ---------------------------------------------------------------------------


def homeserver_keys(config: dict[str, Any], config_path: str) -> tuple[str | None, list[Key]]:
    """(path of the key file or None when inline, its keys), located as Synapse does."""
    if "signing_key" in config:
        inline = config["signing_key"]
        if not isinstance(inline, str):
            raise ToolError(f"{config_path}: signing_key is not a string")
        fmt, keys = parse(inline, f"{config_path}: signing_key")
        return None, keys
    path = config.get("signing_key_path")
    if path is None:
        server_name = config.get("server_name")
        if not isinstance(server_name, str):
            raise ToolError(f"{config_path}: neither signing_key_path nor server_name is set")
        directory = os.path.dirname(os.path.abspath(config_path))
        path = os.path.join(directory, server_name + ".signing.key")
    if not isinstance(path, str):
        raise ToolError(f"{config_path}: signing_key_path is not a string")
    fmt, keys = read_key_file(path)
    if fmt != "synapse":
        raise ToolError(
            f"{path} is a {fmt} key file; Synapse reads only its own format "
            "(convert it with 'keys generate --input')"
        )
    return path, keys


def local_key_url(config: dict[str, Any]) -> str | None:
    """Base URL of the first http listener on loopback that serves the key resource.

    Synapse serves /_matrix/key/v2/server on listeners with the ``federation`` or
    ``keys`` resource (a ``client``-only listener answers 404).
    """
    for listener in config.get("listeners") or []:
        if not isinstance(listener, dict) or listener.get("type") != "http":
            continue
        names = {
            name
            for resource in listener.get("resources") or []
            if isinstance(resource, dict)
            for name in resource.get("names") or []
        }
        if not names & {"federation", "keys"}:
            continue
        binds = listener.get("bind_addresses")
        if not binds:
            single = listener.get("bind_address")
            binds = [single] if single else ["::", "0.0.0.0"]  # Synapse's default
        port = listener.get("port")
        if not isinstance(port, int) or isinstance(port, bool):
            continue
        if set(binds) & LOOPBACK_V4:
            host = "127.0.0.1"
        elif set(binds) & LOOPBACK_V6:
            host = "[::1]"
        else:
            continue
        scheme = "https" if listener.get("tls") else "http"
        return f"{scheme}://{host}:{port}"
    return None


def fetch_server_keys(base_url: str, verify_tls: bool) -> dict[str, Any]:
    url = base_url.rstrip("/") + KEY_PATH
    context = None
    if url.startswith("https://") and not verify_tls:
        # Only for the URL derived from a loopback listener, whose certificate is issued
        # for the public name; the keys are checked against the file below anyway.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT, context=context) as resp:
            body = resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        raise ToolError(f"GET {url} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ToolError(f"GET {url} failed: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ToolError(f"GET {url} did not return JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("verify_keys"), dict):
        raise ToolError(f"GET {url} did not return a server key response (no verify_keys)")
    return data


def _ts(ms: Any) -> str:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return f"{ms!r} (not an integer)"
    try:
        when = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return f"{ms} ({when:%Y-%m-%d %H:%M:%S} UTC)"


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    config = homeserver_config.load(args.config)
    key_path, keys = homeserver_keys(config, args.config)
    expect_first = normalise_key_id(args.expect_first) if args.expect_first else None
    if args.server_url:
        base_url, verify_tls = args.server_url, True
    else:
        derived = local_key_url(config)
        if derived is None:
            raise ToolError(
                f"{args.config} has no loopback http listener serving federation or keys; "
                "give --server-url"
            )
        base_url, verify_tls = derived, False
    data = fetch_server_keys(base_url, verify_tls)

    problems: list[str] = []
    server_name = data.get("server_name")
    if not isinstance(server_name, str):
        problems.append(f"the response has no server_name string ({server_name!r:.40})")
        server_name = ""
    elif "server_name" in config and server_name != config["server_name"]:
        problems.append(
            f"the server answers as {server_name!r}, the config is for {config['server_name']!r}"
        )
    valid_until = data.get("valid_until_ts")
    if not isinstance(valid_until, int) or valid_until < time.time() * 1000:
        problems.append(f"valid_until_ts {_ts(valid_until)} is not in the future")
    published: dict[str, Any] = data["verify_keys"]
    old = _mapping(data.get("old_verify_keys"))
    signatures = _mapping(_mapping(data.get("signatures")).get(server_name))

    print(f"server: {base_url} (server_name {server_name})")
    print(f"key file: {key_path or args.config + ' (inline signing_key)'}: {_count(keys)}")
    for index, key in enumerate(keys):
        role = "  <- first: Synapse signs with this key" if index == 0 else ""
        entry = published.get(key.key_id)
        if not isinstance(entry, dict):
            print(f"  {key.key_id}: MISSING from verify_keys{role}")
            problems.append(f"{key.key_id} is not published")
            continue
        if entry.get("key") != key.public_base64():
            print(f"  {key.key_id}: published with DIFFERENT key bytes{role}")
            problems.append(f"{key.key_id} is published with a different public key")
            continue
        signed = _signature_ok(data, server_name, key) if key.key_id in signatures else None
        note = {True: ", signature ok", False: ", BAD signature", None: ", not signed"}[signed]
        if signed is False:
            problems.append(f"the response's signature by {key.key_id} does not verify")
        elif signed is None and index == 0:
            problems.append(f"the response is not signed by the first key {key.key_id}")
        print(f"  {key.key_id}: published, valid_until_ts {_ts(valid_until)}{note}{role}")
        if key.key_id in old:
            problems.append(f"{key.key_id} is both in verify_keys and old_verify_keys")

    file_ids = {key.key_id for key in keys}
    for key_id in published:
        if key_id not in file_ids:
            print(f"  {key_id}: published but NOT in the key file")
            problems.append(f"{key_id} is published but not in the key file (stale file?)")

    first = keys[0].key_id
    print(f"first key (signs): {first}")
    if expect_first is not None and first != expect_first:
        problems.append(f"the first key is {first}, expected {expect_first}")

    if old:
        print("old_verify_keys:")
        for key_id, entry in old.items():
            expired = entry.get("expired_ts") if isinstance(entry, dict) else None
            print(f"  {key_id}: expired_ts {_ts(expired)}")
    else:
        print("old_verify_keys: none")

    if problems:
        for problem in problems:
            print(f"PROBLEM: {problem}")
        more = f" (+{len(problems) - 1} more, see above)" if len(problems) > 1 else ""
        raise ToolError(f"check failed: {problems[0]}{more}")
    print("ok")
    return 0


def _mapping(value: Any) -> dict[str, Any]:
    """A JSON object from the response, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _signature_ok(data: dict[str, Any], server_name: Any, key: Key) -> bool:
    try:
        signedjson.sign.verify_signed_json(data, str(server_name), key.verify_key())
    except Exception:  # SignatureVerifyException or malformed signatures
        return False
    return True


# ---------------------------------------------------------------------------
# revoke
# ---------------------------------------------------------------------------


def cmd_revoke(args: argparse.Namespace) -> int:
    config = homeserver_config.load(args.config)
    key_path, keys = homeserver_keys(config, args.config)
    if key_path is None:
        raise ToolError(f"{args.config} has the key inline (signing_key); edit it there")
    key_id = normalise_key_id(args.key_id)
    remaining = [key for key in keys if key.key_id != key_id]
    if len(remaining) == len(keys):
        raise ToolError(f"{key_id} is not in {key_path} (it has {_ids(keys)})")
    if not remaining:
        raise ToolError(f"{key_id} is the only key in {key_path}; a homeserver needs one")
    revoked = next(key for key in keys if key.key_id == key_id)
    old = config.get("old_signing_keys")
    if isinstance(old, dict) and key_id in old:
        print(f"note: old_signing_keys in {args.config} already lists {key_id}", file=sys.stderr)
    if keys[0].key_id == key_id:
        print(
            f"warning: {key_id} is the key Synapse signs with; after the restart it signs "
            f"with {remaining[0].key_id}",
            file=sys.stderr,
        )
    write_secret_file(args.output, serialise(remaining, "synapse"), args.force)
    expired_ts = int(time.time() * 1000)
    print(f"# {args.output}: {key_path} without {key_id} ({_count(remaining)} left)")
    print("# Add this under old_signing_keys in homeserver.yaml, then deploy the file and restart:")
    print("old_signing_keys:")
    print(f'  "{key_id}": {{key: "{revoked.public_base64()}", expired_ts: {expired_ts}}}')
    return 0

