"""Federation seam: Synapse's own X-Matrix ``Authenticator`` and per-origin rate limiter.

MSC1902's ``remote_media`` paths are served by Synapse's legacy media servlets, which
know nothing of X-Matrix; the module checks the signature with exactly the code Synapse
uses for its federation servlets (keyring, destination check, ACLs) before handing over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapse.federation.transport.server._base import Authenticator

from synapse_msc3916.synapse_adapter.probes import Need, method, source_mentions

if TYPE_CHECKING:
    from synapse.server import HomeServer

NEEDS = [
    method("synapse.federation.transport.server._base.Authenticator.__init__", "X-Matrix checks", params=("hs",)),
    method("synapse.federation.transport.server._base.Authenticator.authenticate_request",
           "X-Matrix checks", params=("request", "content")),
    method("synapse.server.HomeServer.get_federation_ratelimiter", "per-origin federation rate limits"),
    method("synapse.util.ratelimitutils.FederationRateLimiter.ratelimit", "per-origin federation rate limits",
           params=("host",)),
    # federation_auth.py holds the rate-limit slot until Synapse's servlet has answered,
    # by awaiting the deferred Synapse's async resources record on the request.
    Need("synapse.http.site.SynapseRequest.__init__", "the rate-limit slot lasts the whole answer",
         check=lambda init: source_mentions(init, "render_deferred")),
    Need("synapse.module_api.run_in_background", "the signed hand-over runs in its own log context"),
    Need("synapse.module_api.make_deferred_yieldable", "the signed hand-over waits for Synapse's answer"),
]


def federation_authenticator(hs: HomeServer) -> Authenticator:
    return Authenticator(hs)


def federation_ratelimiter(hs: HomeServer) -> Any:
    return hs.get_federation_ratelimiter()
