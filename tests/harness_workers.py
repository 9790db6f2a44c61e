"""Private PostgreSQL and Redis servers, and a Synapse deployment with media workers.

PostgreSQL comes from the machine's own binaries (``initdb`` into a temporary directory,
as the ``postgres`` user when the tests run as root); Redis is ``redis-server`` with no
persistence. Both bind 127.0.0.1 on free ports and are stopped by PID.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.harness import PYTHON, TOPOLOGY, Synapse, free_port, stop_process, wait_for


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"{name} not found: install PostgreSQL (Debian: postgresql)")
    return candidates[-1]


class PostgreSQL:
    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.settings = dict(settings or {})  # extra ``-c name=value`` (the benchmarks)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="msc3916-pg-"))
        self.data = self.dir / "data"
        self.proc: subprocess.Popen | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def start(self) -> PostgreSQL:
        subprocess.run(
            self._as_user + [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                             "--auth=trust", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True,
        )
        self.log = open(self.dir / "postgres.log", "ab")
        self._launch()
        return self

    def _launch(self) -> None:
        self.proc = subprocess.Popen(
            self._as_user + [_pg_bin("postgres"), "-D", str(self.data), "-h", "127.0.0.1",
                             "-p", str(self.port), "-k", str(self.dir), "-c", "fsync=off",
                             "-c", "max_connections=200"]
            + [arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._ready, 60, "postgresql", self.proc)

    def restart(self) -> None:
        """A fast shutdown, which cuts every client's connection (as a crash, a failover
        or an upgrade does), then a start on the same port and data."""
        assert self.proc is not None
        subprocess.run(
            self._as_user + [_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
            check=True, capture_output=True,
        )
        self.proc.wait(30)
        self._launch()

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)

    def _ready(self) -> bool:
        self.connect().close()
        return True

    def create_database(self, name: str) -> dict[str, Any]:
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        conn.close()
        return self.database_config(name)

    def database_config(self, name: str) -> dict[str, Any]:
        """Synapse's ``database:`` block for a database of this server."""
        return {
            "name": "psycopg2",
            "args": {"user": "postgres", "host": "127.0.0.1", "port": self.port,
                     "database": name, "cp_min": 1, "cp_max": 10},
        }

    def query(self, dbname: str, sql: str, args: tuple = ()) -> list[tuple]:
        conn = self.connect(dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                rows = cur.fetchall() if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, term_timeout=20)
            self.proc = None
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (Debian: redis-server)")
        self.log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._ready, 30, "redis", self.proc)
        return self

    def _ready(self) -> bool:
        import socket

        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.log.close()


class Worker:
    """A Synapse generic worker sharing the main process's configuration."""

    def __init__(self, main: Synapse, name: str, resources: list[str]):
        self.main = main
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server_name = main.server_name
        self.config_path = main.dir / f"{name}.yaml"
        self.log_file = main.dir / f"{name}.log"
        self.stdout_file = main.dir / f"{name}.stdout.log"
        (main.dir / f"{name}.log.config").write_text(
            (main.dir / "log.config").read_text().replace(str(main.log_file), str(self.log_file))
        )
        self.config = {
            "worker_app": "synapse.app.generic_worker",
            "enable_media_repo": True,
            "worker_name": name,
            "worker_log_config": str(main.dir / f"{name}.log.config"),
            "worker_listeners": [
                {"type": "http", "port": self.port, "bind_addresses": ["127.0.0.1"],
                 "resources": [{"names": resources, "compress": False}]},
            ],
        }
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> Worker:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> Worker:
        """Start the process without waiting for it (to start several at once)."""
        self.stdout = open(self.stdout_file, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "synapse.app.generic_worker", "-c", str(self.main.config_path),
             "-c", str(self.config_path)],
            cwd=self.main.dir, env=self.main.env(), stdout=self.stdout, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        return self

    def wait_ready(self, timeout: float = 90.0) -> Worker:
        from tests.harness import request

        try:
            wait_for(lambda: request("GET", self.base_url, "/health", timeout=2).status == 200,
                     timeout, f"worker {self.name}", self.proc)
        except Exception as e:
            raise RuntimeError(f"{e}\n{self.output()[-4000:]}") from None
        return self

    output = Synapse.output

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, 9)
            self.proc.wait(10)
            self.proc = None
            self.stdout.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.stdout.close()

    # the same request helpers as a Synapse, against this worker's listener
    get = Synapse.get
    upload = Synapse.upload


class Deployment:
    """PostgreSQL, Redis, a Synapse main process and media workers, all private."""

    def __init__(
        self,
        directory: Path,
        media_workers: int = 2,
        module_config: dict[str, Any] | None = None,
        storage_providers: list[dict[str, Any]] | None = None,
        extra_config: dict[str, Any] | None = None,
    ):
        self.dir = Path(directory)
        self.postgres = PostgreSQL()
        self.redis = Redis(self.dir / "redis")
        self.media_worker_count = media_workers
        self.module_config = {} if module_config is None else module_config
        self.storage_providers = storage_providers
        self.extra_config = extra_config or {}
        self.main: Synapse | None = None
        self.workers: list[Worker] = []

    def start(self) -> Deployment:
        self.postgres.start()
        self.redis.start()
        database = self.postgres.create_database("synapse")
        replication_port = free_port()
        names = [f"media{i + 1}" for i in range(self.media_worker_count)]
        extra = {
            "database": database,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": self.redis.port},
            "instance_map": {"main": {"host": "127.0.0.1", "port": replication_port}},
            "enable_media_repo": False,
            "media_instance_running_background_jobs": names[0] if names else None,
        }
        extra.update(self.extra_config)
        if extra["media_instance_running_background_jobs"] is None:
            del extra["media_instance_running_background_jobs"]  # unset, not null
        client_port = free_port()
        listeners = [
            {"port": client_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
             "resources": [{"names": ["client", "federation"], "compress": False}]},
            {"port": replication_port, "bind_addresses": ["127.0.0.1"], "type": "http",
             "resources": [{"names": ["replication"]}]},
        ]
        self.main = Synapse(
            self.dir / "main", name="main", listeners=listeners,
            server_name=f"localhost:{client_port}", module_config=self.module_config,
            storage_providers=self.storage_providers, extra_config=extra,
        )
        self.main.port = client_port
        self.main.base_url = f"http://127.0.0.1:{client_port}"
        self.main.start(timeout=120)
        self.workers = [Worker(self.main, name, ["media"]) for name in names]
        for worker in self.workers:
            worker.start()
        return self

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.main is not None:
            self.main.stop()
        self.redis.stop()
        self.postgres.stop()


# ---------------------------------------------------------------------------
# The same Synapse API, backed by workers: for running the whole suite on them
# ---------------------------------------------------------------------------

_shared: dict[str, Any] = {}


def shared_postgres() -> PostgreSQL:
    if "postgres" not in _shared:
        _shared["postgres"] = PostgreSQL().start()
    return _shared["postgres"]


@contextmanager
def postgres_for_module() -> Iterator[PostgreSQL]:
    """The workers topology's server when there is one, else a server of the caller's own
    (a test module's), stopped afterwards."""
    if TOPOLOGY == "workers":
        yield shared_postgres()
        return
    server = PostgreSQL()
    try:
        yield server.start()
    finally:
        server.stop()


def shared_redis() -> Redis:
    if "redis" not in _shared:
        _shared["redis"] = Redis(Path(tempfile.mkdtemp(prefix="msc3916-redis-"))).start()
    return _shared["redis"]


def stop_shared() -> None:
    for key in ("redis", "postgres"):
        server = _shared.pop(key, None)
        if server is not None:
            server.stop()


class _CombinedLog:
    """``log_file`` of a deployment: every process's log, read together."""

    def __init__(self, paths: Any):
        self._paths = paths

    def read_text(self, errors: str = "replace") -> str:
        return "".join(p.read_text(errors=errors) for p in self._paths() if p.exists())

    def exists(self) -> bool:
        return True


class WorkerSynapse(Synapse):
    """A Synapse deployment with the ``Synapse`` test API: PostgreSQL, Redis, a main
    process and media workers behind a path-splitting proxy on the public ports."""

    def __init__(self, directory: Path, *, media_workers: int = 2, **kwargs: Any):
        self.media_worker_count = media_workers
        self.postgres = shared_postgres()
        self.redis = shared_redis()
        self.main_port = free_port()
        self.replication_port = free_port()
        self.workers: list[Worker] = []
        self.proxies: list[subprocess.Popen] = []
        self.db_name = "syn_" + os.urandom(6).hex()
        super().__init__(directory, **kwargs)
        self.main_url = f"http://127.0.0.1:{self.main_port}"
        self.log_file = _CombinedLog(self._log_paths)  # type: ignore[assignment]

    def _log_paths(self) -> list[Path]:
        return [self.dir / "homeserver.log"] + [w.log_file for w in self.workers]

    def _build_config(self, module_config: Any, storage_providers: Any, extra: dict[str, Any]) -> dict[str, Any]:
        config = super()._build_config(module_config, storage_providers, extra)
        if self.extra_listeners is not None:
            raise ValueError("custom listeners are a single-process test")
        names = [f"media{i + 1}" for i in range(self.media_worker_count)]
        config["listeners"] = [
            {"port": self.main_port, "bind_addresses": ["127.0.0.1"], "type": "http", "tls": False,
             "resources": [{"names": ["client", "federation"], "compress": False}]},
            {"port": self.replication_port, "bind_addresses": ["127.0.0.1"], "type": "http",
             "resources": [{"names": ["replication"]}]},
            {"port": self.metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"},
        ]
        config["database"] = self.postgres.create_database(self.db_name)
        config["redis"] = {"enabled": True, "host": "127.0.0.1", "port": self.redis.port}
        config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
        config["enable_media_repo"] = False
        config["media_instance_running_background_jobs"] = names[0]
        config.update(extra)
        if config["media_instance_running_background_jobs"] is None:
            del config["media_instance_running_background_jobs"]  # unset, not null
        return config

    def start(self, timeout: float = 120.0, app: str = "synapse.app.homeserver") -> WorkerSynapse:
        public = self.base_url
        self.base_url = self.main_url
        try:
            super().start(timeout, app)
        finally:
            self.base_url = public
        if not self.workers:
            for i in range(self.media_worker_count):
                worker = Worker(self, f"media{i + 1}", ["media"])
                worker.config["worker_listeners"].append(
                    {"type": "metrics", "port": free_port(), "bind_addresses": ["127.0.0.1"]}
                )
                worker.config_path.write_text(yaml.safe_dump(worker.config))
                self.workers.append(worker)
        for worker in self.workers:
            worker.start(timeout)
        media = ",".join(f"127.0.0.1:{w.port}" for w in self.workers)
        self._proxy(self.port, media)
        if self.tls:
            self._proxy(self.federation_port, media, tls=True)
        from tests.harness import request

        wait_for(lambda: request("GET", self.base_url, "/health", timeout=2).status == 200, 30, "proxy")
        return self

    def _proxy(self, port: int, media: str, tls: bool = False) -> None:
        args = [PYTHON, str(Path(__file__).parent / "proxy.py"), "--port", str(port),
                "--main", f"127.0.0.1:{self.main_port}", "--media", media]
        if tls:
            args += ["--tls", str(self.dir / "tls.crt"), str(self.dir / "tls.key")]
        log = open(self.dir / f"proxy-{port}.log", "ab")
        self.proxies.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def stop(self) -> None:
        for p in self.proxies:
            stop_process(p)
        self.proxies = []
        for worker in self.workers:
            worker.stop()
        super().stop()

    def output(self) -> str:
        return super().output() + "".join(w.output() for w in self.workers)

    def metrics(self) -> str:
        from tests.harness import request

        text = super().metrics()
        for worker in self.workers:
            port = worker.config["worker_listeners"][-1]["port"]
            text += request("GET", f"http://127.0.0.1:{port}", "/_synapse/metrics").body.decode()
        return text

    def sql(self, query: str, args: tuple = ()) -> list[tuple]:
        return self.postgres.query(self.db_name, query.replace("?", "%s"), args)

    def start_expecting_failure(self, timeout: float = 60.0) -> tuple[int, str]:
        """Start a media worker, expecting it to exit: media storage providers are loaded
        (and their configuration checked) only on processes that serve media."""
        worker = Worker(self, "media-check", ["media"])
        result = subprocess.run(
            [PYTHON, "-m", "synapse.app.generic_worker", "-c", str(self.config_path), "-c", str(worker.config_path)],
            cwd=self.dir, env=self.env(), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        if worker.log_file.exists():
            output += worker.log_file.read_text(errors="replace")
        return result.returncode, output
