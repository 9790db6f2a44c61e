"""sample_homeserver.yaml is what the README tells admins to copy: it must start Synapse."""

from __future__ import annotations

import yaml

from tests.harness import REPO_ROOT


def test_sample_blocks_start_synapse(synapse_factory, tmp_path) -> None:
    sample = yaml.safe_load((REPO_ROOT / "sample_homeserver.yaml").read_text())
    providers = sample["media_storage_providers"]
    providers[0]["config"]["directory"] = str(tmp_path / "blobs")
    hs = synapse_factory(
        module_config=sample["modules"][0]["config"], storage_providers=providers
    ).start()
    token = hs.register("sample")
    mid = hs.upload(token, b"sample config works", "text/plain", "s.txt")
    r = hs.get(f"/_matrix/client/unstable/org.matrix.msc3916/media/download/{hs.server_name}/{mid}", token)
    assert r.status == 200 and r.body == b"sample config works"
