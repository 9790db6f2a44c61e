"""The README's first command, `make demo`, brings up a Synapse that answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO_ROOT, free_port, request, wait_for


@pytest.mark.single_process
def test_make_demo_serves_versions(tmp_path: Path) -> None:
    port = free_port()
    venv = Path(sys.executable).parent.parent
    out = open(tmp_path / "demo.out", "wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", f"--assume-old={venv}/.installed", "demo",
         f"VENV={venv}", f"PORT={port}", f"DEMO_DATA={tmp_path / 'data'}"],
        cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: request("GET", base, "/_matrix/client/versions", timeout=2).status == 200,
                 90, "demo", proc)
        versions = request("GET", base, "/_matrix/client/versions").json()
        assert versions["unstable_features"]["org.matrix.msc3916"] is True
        deadline = time.monotonic() + 30
        while b"Press Ctrl-C" not in (tmp_path / "demo.out").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        text = (tmp_path / "demo.out").read_text()
        assert "access token" in text and "register_new_matrix_user" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        out.close()
    # The demo stopped its Synapse on the way out: nothing listens on the port any more.
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
