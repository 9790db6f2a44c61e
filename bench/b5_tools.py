"""B5: `synapse-msc3916 migrate` and `gc` throughput on 10,000 media (S3 backend on SeaweedFS).

A Synapse creates its database and is stopped; then 10,000 local media (1,000 in quick
mode) are written straight into its media store and `local_media_repository`, as Synapse
would have left them (including the `sha256` column Synapse records). One in five repeats
an earlier content. `migrate` loads the store into the bucket; then the rows of every
other media are deleted (as an admin deletion would) and `gc --grace 0s --apply` runs.
Reported: files/s and MiB/s, no goal.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.report import Report
from tests.harness import REPO_ROOT, SeaweedFS, Synapse
from tests.storage_helpers import provider_entry, s3_config

MIB = 1024 * 1024


def _tool(hs: Synapse, *args: str) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "synapse_msc3916.cli", *args, "-c", str(hs.config_path), "--json"],
        cwd=REPO_ROOT, env=hs.env(), capture_output=True, text=True, timeout=1800,
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"synapse-msc3916 {args[0]} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def _create_media(hs: Synapse, count: int) -> tuple[list[str], int]:
    """Files in the media store plus their rows; returns the media ids and total bytes."""
    import sqlite3

    rng = random.Random(5)
    contents: list[bytes] = []
    ids: list[str] = []
    total = 0
    now = int(time.time() * 1000)
    columns = {row[1] for row in hs.sql("PRAGMA table_info(local_media_repository)")}
    rows = []
    for n in range(count):
        if contents and n % 5 == 4:
            data = rng.choice(contents)
        else:
            data = rng.randbytes(rng.randint(1024, 32 * 1024))
            contents.append(data)
        media_id = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(24))
        path = hs.media_store / "local_content" / media_id[0:2] / media_id[2:4] / media_id[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        row = {
            "media_id": media_id, "media_type": "application/octet-stream", "media_length": len(data),
            "created_ts": now, "upload_name": f"f{n}.bin", "user_id": f"@bench:{hs.server_name}",
            "last_access_ts": now, "sha256": hashlib.sha256(data).hexdigest(), "authenticated": True,
        }
        rows.append({k: v for k, v in row.items() if k in columns})
        ids.append(media_id)
        total += len(data)
    conn = sqlite3.connect(hs.dir / "homeserver.db")
    try:
        keys = list(rows[0])
        conn.executemany(
            f"INSERT INTO local_media_repository ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
            [tuple(r[k] for k in keys) for r in rows],
        )
        conn.commit()
    finally:
        conn.close()
    return ids, total


def run(report: Report, workdir: Path, quick: bool = False) -> None:
    count = 1000 if quick else 10_000
    workdir.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(workdir / "seaweedfs")
    hs = Synapse(workdir / "hs", storage_providers=[provider_entry(s3_config(weed, "b5-media"))])
    try:
        weed.start()
        weed.create_bucket("b5-media")
        hs.start()
        hs.stop()  # the database exists now; the tools run against it with Synapse stopped
        ids, total = _create_media(hs, count)

        seconds, migrated = _tool(hs, "migrate", "--min-age", "0s")  # just uploaded
        assert migrated["files"] == count, migrated
        report.add(
            "B5", f"migrate {count:,} local media", "synapse-msc3916 migrate",
            **{"files": f"{migrated['files']:,}", "objects written": f"{migrated['written']:,}",
               "MiB": f"{migrated['bytes'] / MIB:.0f}", "seconds": f"{seconds:.1f}",
               "files/s": f"{count / seconds:.0f}", "MiB/s": f"{migrated['bytes'] / MIB / seconds:.1f}"},
        )

        gone = ids[::2]
        hs.sql(
            f"DELETE FROM local_media_repository WHERE media_id IN ({', '.join('?' * len(gone))})",
            tuple(gone),
        )
        seconds, collected = _tool(hs, "gc", "--grace", "0s", "--apply")
        freed = collected["bytes_freed"]
        report.add(
            "B5", f"gc after deleting {len(gone):,} media", "synapse-msc3916 gc --apply",
            **{"files": f"{collected['paths_removed']:,}",
               "objects deleted": f"{collected['objects_deleted'] + collected['orphan_objects_deleted']:,}",
               "MiB": f"{freed / MIB:.0f}", "seconds": f"{seconds:.1f}",
               "files/s": f"{collected['paths_removed'] / seconds:.0f}",
               "MiB/s": f"{freed / MIB / seconds:.1f}"},
        )
        report.note(
            "B5",
            f"The {count:,} media (1-32 KiB each, {total / MIB:.0f} MiB, one in five a duplicate of an "
            "earlier content) were created directly: files written into the media store and rows "
            "inserted into `local_media_repository` of a database Synapse created, with the "
            "`sha256` Synapse records for its uploads, so `migrate` copies without re-hashing. "
            "Going through Synapse's upload API would have measured the provider's upload path "
            "(B3) instead. Both tools run as `python -m synapse_msc3916.cli … --json` against the "
            "SQLite database with Synapse stopped; times are wall-clock including the tool's "
            "start-up. `gc` files = index paths removed (their media rows were deleted); "
            "MiB = object bytes freed; objects deleted counts contents no remaining path shares.",
        )
    finally:
        hs.stop()
        weed.stop()
