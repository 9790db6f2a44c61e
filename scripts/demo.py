"""`make demo`: a throwaway Synapse on localhost with the module and the dedup storage.

Everything lives in ./demo-data (delete it to start over). Stops on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import Synapse, free_port  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--data", default=str(REPO / "demo-data"))
    args = parser.parse_args()
    port = args.port or free_port()
    # Absolute: Synapse resolves relative paths from its own config directory.
    data = Path(args.data).resolve()
    listeners = [
        {
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client", "federation"], "compress": False}],
        }
    ]
    hs = Synapse(
        data,
        name="demo",
        listeners=listeners,
        server_name=f"localhost:{port}",
        module_config={},
        storage_providers=[
            {
                "module": "synapse_msc3916.DedupStorageProvider",
                "store_local": True,
                "store_remote": True,
                "store_synchronous": True,
                "config": {"backend": "file", "directory": str(data / "blobs")},
            }
        ],
    )
    hs.port = port
    hs.base_url = f"http://127.0.0.1:{port}"
    hs.start()
    token = hs.register(f"demo{int(time.time())}")
    url = hs.base_url
    print(
        f"""
Synapse {hs.server_name} is running at {url} with synapse-msc3916 (data: {data}).

Register another user:
  {sys.executable} -m synapse._scripts.register_new_matrix_user \\
      -c {hs.config_path} -u alice -p alice-pw --no-admin {url}

A user is ready, with access token {token}. Try:
  curl -s -X POST -H "Authorization: Bearer {token}" -H 'Content-Type: text/plain' \\
       --data-binary 'hello media' '{url}/_matrix/media/v3/upload?filename=hello.txt'
  # then, with the media id from content_uri:
  curl -s -H "Authorization: Bearer {token}" \\
       {url}/_matrix/client/unstable/org.matrix.msc3916/media/download/{hs.server_name}/MEDIA_ID
  curl -s -H "Authorization: Bearer {token}" {url}/_matrix/client/v1/media/download/{hs.server_name}/MEDIA_ID
  curl -s {url}/_matrix/client/versions

Logs: {hs.log_file}. Press Ctrl-C to stop.
""",
        flush=True,
    )
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop and hs.proc is not None and hs.proc.poll() is None:
            time.sleep(0.5)
    finally:
        hs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
