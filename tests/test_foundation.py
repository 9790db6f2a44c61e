"""Foundation: the module loads in a real Synapse, routes per listener, hands back the rest."""

from __future__ import annotations

from tests.harness import Synapse


def test_synapse_starts_with_module_and_serves_versions(synapse: Synapse) -> None:
    resp = synapse.get("/_matrix/client/versions")
    assert resp.status == 200
    features = resp.json()["unstable_features"]
    assert features["org.matrix.msc3916"] is True
    assert features["org.matrix.msc1902"] is True
