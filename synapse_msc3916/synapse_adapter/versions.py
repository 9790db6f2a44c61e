"""``/versions`` seam: Synapse's own servlet, with the module's unstable features added."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapse.module_api import DirectServeJsonResource
from synapse.rest.client.versions import VersionsRestServlet

from synapse_msc3916.synapse_adapter.probes import method

if TYPE_CHECKING:
    from synapse.http.site import SynapseRequest
    from synapse.server import HomeServer

NEEDS = [
    method("synapse.rest.client.versions.VersionsRestServlet.__init__", "Synapse's /versions answer", params=("hs",)),
    method("synapse.rest.client.versions.VersionsRestServlet.on_GET", "Synapse's /versions answer",
           params=("request",)),
]


class VersionsResource(DirectServeJsonResource):
    """Synapse's own ``/versions`` servlet, with the module's unstable features added."""

    isLeaf = True

    def __init__(self, hs: HomeServer, features: dict[str, bool]):
        super().__init__()
        self._servlet = VersionsRestServlet(hs)
        self._features = features

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, Any]:
        code, body = await self._servlet.on_GET(request)
        body.setdefault("unstable_features", {}).update(self._features)
        return code, body
