"""The README's first command, `make demo`, run exactly as written in a fresh clone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, request, wait_for

DEMO_PORT = 8008  # the README's URL: make demo takes no arguments


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _fresh_clone(tmp_path: Path) -> Path:
    """``git clone`` of this checkout's HEAD, reusing the running venv.

    ``make demo`` first runs ``make install``, which builds ``.venv`` from PyPI; that
    is what a new user waits for once, but it is minutes of CI for nothing new. The
    clone gets a ``.venv`` symlink to the venv running this test (which ``make install``
    built and stamped), and its ``setup.cfg``/``pyproject.toml`` are dated before that
    stamp so that make sees an up-to-date install. ``scripts/demo.py`` imports the
    clone's own code (it puts its checkout first on ``sys.path``), so what runs is the
    clone, not this worktree.
    """
    venv = Path(sys.prefix)
    if not (venv / ".installed").exists():
        pytest.skip(f"{venv} was not built by `make install` (no .installed stamp to reuse)")
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    stamp = (venv / ".installed").stat().st_mtime
    for name in ("setup.cfg", "pyproject.toml"):
        os.utime(clone / name, (stamp - 60, stamp - 60))
    return clone


@pytest.mark.single_process
def test_make_demo_serves_versions(tmp_path: Path) -> None:
    if _port_in_use(DEMO_PORT):
        pytest.skip(f"127.0.0.1:{DEMO_PORT} is taken by another process; `make demo` needs it")
    clone = _fresh_clone(tmp_path)
    out = open(tmp_path / "demo.out", "wb")
    proc = subprocess.Popen(
        ["make", "demo"],
        cwd=clone, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{DEMO_PORT}"
        wait_for(lambda: request("GET", base, "/_matrix/client/versions", timeout=2).status == 200,
                 90, "demo", proc)
        versions = request("GET", base, "/_matrix/client/versions").json()
        assert versions["unstable_features"]["org.matrix.msc3916"] is True
        deadline = time.monotonic() + 30
        while b"Press Ctrl-C" not in (tmp_path / "demo.out").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = (tmp_path / "demo.out").read_text()
        assert "access token" in text and "register_new_matrix_user" in text
        # The data went where the README says: ./demo-data of the clone.
        assert (clone / "demo-data" / "homeserver.yaml").exists()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        out.close()
    # The demo stopped its Synapse on the way out: nothing listens on the port any more.
    assert not _port_in_use(DEMO_PORT)
