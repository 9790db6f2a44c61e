"""Ed25519 signing-key files in the three formats a Matrix deployment meets (issue 6).

Pure functions: parse, convert and write key files. Nothing here imports Synapse; the
command-line side (``keys generate|combine|check|revoke``) lives in ``keys_cli``, which
imports this file (never the other way round).

The formats, as read from their descriptions (no code copied from any project):

``synapse``
    One key per line: ``ed25519 <version> <unpadded base64 of the 32-byte seed>``.
    Synapse signs with the first line and publishes every line under ``verify_keys``.
    Synapse itself ignores blank lines, so this parser does too; output never has any.

``dendrite``
    A PEM block ``-----BEGIN MATRIX PRIVATE KEY-----`` with a ``Key-ID: ed25519:<version>``
    header; the body is the standard (padded) base64 of the 32-byte ed25519 *seed*
    (Dendrite builds its key with Go's ``ed25519.NewKeyFromSeed`` from those bytes).

``mmr`` (matrix-media-repo)
    A PEM block ``-----BEGIN MMR PRIVATE KEY-----`` with the headers
    ``Key-ID: ed25519:<version>`` and ``Version: 1``; the body is the base64 of the
    32-byte seed as well. Our reading: both Go projects store the seed, not Go's 64-byte
    ``ed25519.PrivateKey`` (seed || public key). A 64-byte body is still accepted when
    its second half is the public key of its first half, and is rewritten as the seed.

A file may hold several keys (lines or PEM blocks); PEM blocks of both types may be
mixed. Key versions must match the Matrix key-id grammar ``[A-Za-z0-9_]+``.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import secrets
import string
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import signedjson.key
from unpaddedbase64 import encode_base64

from synapse_msc3916.homeserver_config import ToolError

ALGORITHM = "ed25519"
SEED_BYTES = 32
FORMATS = ("synapse", "dendrite", "mmr")
PEM_TYPES = {"dendrite": "MATRIX PRIVATE KEY", "mmr": "MMR PRIVATE KEY"}
FORMAT_OF_PEM_TYPE = {v: k for k, v in PEM_TYPES.items()}
MMR_FILE_VERSION = "1"
VERSION_RE = re.compile(r"[A-Za-z0-9_]+")
_B64_CHARS = re.compile(r"[A-Za-z0-9+/\-_]*")
_PEM_B64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_NEW_VERSION_ALPHABET = string.ascii_letters + string.digits
NEW_VERSION_LENGTH = 8


class KeyFormatError(ToolError):
    """A key file that cannot be read as any supported format (one line, no secrets)."""


@dataclass(frozen=True)
class Key:
    """One ed25519 signing key: its version (the part after ``ed25519:``) and 32-byte seed."""

    version: str
    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_BYTES:
            raise KeyFormatError(f"an ed25519 seed is {SEED_BYTES} bytes, not {len(self.seed)}")
        check_version(self.version)

    def __repr__(self) -> str:  # never show the seed in logs or test output
        return f"Key({self.key_id!r})"

    @property
    def key_id(self) -> str:
        return f"{ALGORITHM}:{self.version}"

    def signing_key(self) -> Any:
        return signedjson.key.decode_signing_key_base64(
            ALGORITHM, self.version, encode_base64(self.seed)
        )

    def verify_key(self) -> Any:
        return signedjson.key.get_verify_key(self.signing_key())

    def public_base64(self) -> str:
        """The unpadded base64 public key, as published under ``verify_keys``."""
        return str(signedjson.key.encode_verify_key_base64(self.verify_key()))


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise KeyFormatError(
            f"key version {version[:40]!r} is not in the Matrix key-id grammar [A-Za-z0-9_]+"
        )
    return version


def normalise_key_id(key_id: str) -> str:
    """``ed25519:abc`` or plain ``abc`` -> ``ed25519:abc``; other algorithms are refused."""
    if ":" in key_id:
        algorithm, _, version = key_id.partition(":")
        if algorithm != ALGORITHM:
            raise KeyFormatError(f"unknown key algorithm {algorithm[:20]!r} (only ed25519)")
    else:
        version = key_id
    return f"{ALGORITHM}:{check_version(version)}"


def random_version(length: int = NEW_VERSION_LENGTH) -> str:
    return "".join(secrets.choice(_NEW_VERSION_ALPHABET) for _ in range(length))


def new_key(version: str | None = None) -> Key:
    """A fresh key from signedjson's generator, with a random alphanumeric version."""
    signing_key = signedjson.key.generate_signing_key(version or random_version())
    return Key(signing_key.version, bytes(signing_key.encode()))


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def _decode_synapse_seed(text: str, where: str) -> bytes:
    """Base64 the way Synapse reads it (padding optional, standard or URL-safe), strictly."""
    body = text.rstrip("=")
    if len(text) - len(body) > 2 or not _B64_CHARS.fullmatch(body) or len(body) % 4 == 1:
        raise KeyFormatError(f"{where}: the key is not valid base64")
    padded = body + "=" * (-len(body) % 4)
    try:
        seed = base64.b64decode(padded, altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{where}: the key is not valid base64") from None
    if len(seed) != SEED_BYTES:
        raise KeyFormatError(
            f"{where}: the key is {len(seed)} bytes, an ed25519 seed is {SEED_BYTES}"
            " (truncated or not a signing key?)"
        )
    return seed


def _parse_synapse(lines: Sequence[str], source: str) -> list[Key]:
    keys = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise KeyFormatError(
                f"{where}: expected 'ed25519 <version> <base64 key>', found {len(fields)} fields"
            )
        algorithm, version, key_base64 = fields
        if algorithm != ALGORITHM:
            raise KeyFormatError(
                f"{where}: unknown key algorithm {algorithm[:20]!r} (only ed25519)"
            )
        try:
            check_version(version)
        except KeyFormatError as e:
            raise KeyFormatError(f"{where}: {e}") from None
        keys.append(Key(version, _decode_synapse_seed(key_base64, where)))
    return keys


def _pem_seed(body: bytes, where: str) -> bytes:
    if len(body) == SEED_BYTES:
        return body
    if len(body) == 2 * SEED_BYTES:
        seed, public = body[:SEED_BYTES], body[SEED_BYTES:]
        if bytes(Key("x", seed).verify_key().encode()) == public:
            return seed
        raise KeyFormatError(f"{where}: 64-byte key whose second half is not its public key")
    raise KeyFormatError(
        f"{where}: the key is {len(body)} bytes, an ed25519 seed is {SEED_BYTES}"
        " (truncated or not a signing key?)"
    )


def _parse_pem_block(
    pem_type: str, content: Sequence[str], where: str
) -> tuple[str, Key]:
    fmt = FORMAT_OF_PEM_TYPE.get(pem_type)
    if fmt is None:
        raise KeyFormatError(
            f"{where}: PEM block type {pem_type[:40]!r} is not a Matrix signing key"
            f" (expected {' or '.join(PEM_TYPES.values())})"
        )
    headers: dict[str, str] = {}
    i = 0
    while i < len(content) and ":" in content[i]:
        name, _, value = content[i].partition(":")
        headers[name.strip()] = value.strip()
        i += 1
    body_lines = [line.strip() for line in content[i:] if line.strip()]
    body_text = "".join(body_lines)
    if not body_text:
        raise KeyFormatError(f"{where}: the PEM block has no key data")
    if not _PEM_B64_CHARS.fullmatch(body_text) or len(body_text) % 4:
        raise KeyFormatError(f"{where}: the PEM body is not valid base64")
    try:
        body = base64.b64decode(body_text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{where}: the PEM body is not valid base64") from None
    key_id = headers.get("Key-ID")
    if not key_id:
        raise KeyFormatError(f"{where}: the PEM block has no Key-ID header")
    if ":" not in key_id:
        raise KeyFormatError(f"{where}: Key-ID {key_id[:40]!r} is not 'ed25519:<version>'")
    try:
        version = normalise_key_id(key_id).partition(":")[2]
    except KeyFormatError as e:
        raise KeyFormatError(f"{where}: {e}") from None
    if fmt == "mmr" and headers.get("Version") != MMR_FILE_VERSION:
        found = headers.get("Version")
        raise KeyFormatError(
            f"{where}: unsupported MMR key file Version {found[:20]!r} (expected 1)"
            if found is not None
            else f"{where}: the MMR PEM block has no 'Version: 1' header"
        )
    return fmt, Key(version, _pem_seed(body, where))


def _parse_pem(lines: Sequence[str], source: str) -> tuple[set[str], list[Key]]:
    formats: set[str] = set()
    keys: list[Key] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line:
            continue
        if not (line.startswith("-----BEGIN ") and line.endswith("-----") and len(line) > 16):
            raise KeyFormatError(f"{source}: line {i}: text outside a PEM block")
        pem_type = line[len("-----BEGIN ") : -len("-----")]
        start = i
        end_line = f"-----END {pem_type}-----"
        content = []
        while i < len(lines) and lines[i].strip() != end_line:
            if lines[i].strip().startswith("-----"):
                raise KeyFormatError(
                    f"{source}: line {i + 1}: expected {end_line[:60]!r} to close line {start}"
                )
            content.append(lines[i])
            i += 1
        if i >= len(lines):
            raise KeyFormatError(f"{source}: line {start}: the PEM block is never closed")
        i += 1
        fmt, key = _parse_pem_block(pem_type, content, f"{source}: line {start}")
        formats.add(fmt)
        keys.append(key)
    return formats, keys


def parse(text: str, source: str = "<input>") -> tuple[str, list[Key]]:
    """Detect the format of ``text`` and return it with its keys, in file order.

    The format is ``synapse``, ``dendrite``, ``mmr`` or ``mixed`` (PEM blocks of both
    types). Raises :class:`KeyFormatError` (one line) for anything else, including an
    empty file or a key id present twice.
    """
    lines = text.splitlines()
    if any(line.lstrip().startswith("-----BEGIN ") for line in lines):
        formats, keys = _parse_pem(lines, source)
        fmt = formats.pop() if len(formats) == 1 else "mixed"
    else:
        fmt, keys = "synapse", _parse_synapse(lines, source)
    if not keys:
        raise KeyFormatError(f"{source}: no signing keys in the file")
    ensure_unique(keys, source)
    return fmt, keys


def ensure_unique(keys: Iterable[Key], source: str) -> None:
    seen: set[str] = set()
    for key in keys:
        if key.key_id in seen:
            raise KeyFormatError(f"{source}: key id {key.key_id} appears more than once")
        seen.add(key.key_id)


def read_key_file(path: str) -> tuple[str, list[Key]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KeyFormatError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyFormatError(f"{path}: not a text key file (not UTF-8)") from None
    return parse(text, path)


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _pem_block(pem_type: str, headers: dict[str, str], body: bytes) -> str:
    encoded = base64.b64encode(body).decode("ascii")
    out = [f"-----BEGIN {pem_type}-----"]
    out += [f"{name}: {value}" for name, value in headers.items()]
    out.append("")  # RFC 1421: a blank line ends the headers
    out += [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    out.append(f"-----END {pem_type}-----")
    return "\n".join(out) + "\n"


def serialise(keys: Sequence[Key], fmt: str) -> str:
    """The file text for ``keys`` (in order) in ``fmt``."""
    if not keys:
        raise KeyFormatError("no keys to write")
    if fmt == "synapse":
        out = io.StringIO()
        signedjson.key.write_signing_keys(out, [key.signing_key() for key in keys])
        return out.getvalue()
    if fmt == "dendrite":
        return "".join(
            _pem_block(PEM_TYPES["dendrite"], {"Key-ID": key.key_id}, key.seed) for key in keys
        )
    if fmt == "mmr":
        return "".join(
            _pem_block(
                PEM_TYPES["mmr"], {"Key-ID": key.key_id, "Version": MMR_FILE_VERSION}, key.seed
            )
            for key in keys
        )
    raise KeyFormatError(f"unknown key file format {fmt!r} (one of {', '.join(FORMATS)})")


def write_secret_file(path: str, text: str, force: bool = False) -> None:
    """Write ``text`` to ``path`` with mode 0600.

    A new file is created with ``O_CREAT|O_EXCL``; an existing one is only replaced with
    ``force``, atomically (a 0600 temporary file in the same directory, then a rename).
    """
    data = text.encode("utf-8")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        if force and os.path.lexists(path):
            directory = os.path.dirname(os.path.abspath(path))
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keys-", suffix=".tmp")
            try:
                os.fchmod(fd, 0o600)
                _write_all(fd, data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
            return
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise ToolError(f"{path} already exists (use --force to replace it)") from None
        os.fchmod(fd, 0o600)  # whatever the umask
        _write_all(fd, data)
    except OSError as e:
        raise ToolError(f"cannot write {path}: {e.strerror or e}") from None


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
