"""Shared helpers for the storage provider's end-to-end tests."""

from __future__ import annotations

import io
import shutil
from typing import Any

from tests.harness import Synapse

PROVIDER = "synapse_msc3916.DedupStorageProvider"


def provider_entry(config: dict[str, Any], synchronous: bool = True) -> dict[str, Any]:
    return {
        "module": PROVIDER,
        "store_local": True,
        "store_remote": True,
        "store_synchronous": synchronous,
        "config": config,
    }


def s3_config(seaweedfs: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    config = {
        "backend": "s3",
        "bucket": bucket,
        "endpoint_url": seaweedfs.endpoint_url,
        "region_name": "us-east-1",
        "access_key_id": seaweedfs.ACCESS_KEY,
        "secret_access_key": seaweedfs.SECRET_KEY,
        "threadpool_size": 4,
        "connect_timeout": 2,
        "read_timeout": 10,
    }
    config.update(extra)
    return config


def wipe_local_media(hs: Synapse) -> None:
    """Delete every file Synapse keeps locally, so reads must come from the provider."""
    for sub in ("local_content", "local_thumbnails", "remote_content", "remote_thumbnail"):
        shutil.rmtree(hs.media_store / sub, ignore_errors=True)


def png(width: int = 64, height: int = 48, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def download(hs: Synapse, token: str, media_id: str) -> Any:
    return hs.get(f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}", token)


def thumbnail(
    hs: Synapse, token: str, media_id: str, w: int = 32, h: int = 32, method: str = "scale"
) -> Any:
    return hs.get(
        f"/_matrix/client/v1/media/thumbnail/{hs.server_name}/{media_id}"
        f"?width={w}&height={h}&method={method}",
        token,
    )


class PostgreSQL:
    """A throw-away PostgreSQL cluster on loopback, run as the ``postgres`` system user.

    PostgreSQL refuses to run as root, so the server is started through ``runuser``;
    it is stopped by PID like every other server in the harness.
    """

    def __init__(self, directory: Any):
        import pathlib

        from tests.harness import free_port

        self.dir = pathlib.Path(directory)
        self.port = free_port()
        self.proc: Any = None

    def _as_postgres(self, *args: str) -> list[str]:
        import os

        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> PostgreSQL:
        import os
        import subprocess

        from tests.harness import wait_for

        data = self.dir / "data"
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o777)
        subprocess.run(
            self._as_postgres(
                "initdb",
                "-D",
                str(data),
                "-E",
                "UTF8",
                "--locale=C",
                "-A",
                "trust",
                "-U",
                "postgres",
            ),
            check=True,
            capture_output=True,
        )
        self.log = open(self.dir / "postgres.log", "ab")
        self.proc = subprocess.Popen(
            self._as_postgres(
                "postgres",
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                "fsync=off",
            ),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self._ready, 30, "postgres", self.proc)
        return self

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname)

    def _ready(self) -> bool:
        self.connect().close()
        return True

    def create_database(self, name: str) -> None:
        conn = self.connect()
        conn.autocommit = True
        conn.cursor().execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
        conn.close()

    def database_config(self, name: str) -> dict[str, Any]:
        return {
            "name": "psycopg2",
            "args": {
                "user": "postgres",
                "host": "127.0.0.1",
                "port": self.port,
                "database": name,
                "cp_min": 1,
                "cp_max": 5,
            },
        }

    def stop(self) -> None:
        from tests.harness import stop_process

        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.log.close()
