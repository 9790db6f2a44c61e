"""Federation seam: Synapse's own X-Matrix ``Authenticator`` and per-origin rate limiter.

MSC1902's ``remote_media`` paths are served by Synapse's legacy media servlets, which
know nothing of X-Matrix; the module checks the signature with exactly the code Synapse
uses for its federation servlets (keyring, destination check, ACLs) before handing over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synapse.federation.transport.server._base import Authenticator

from synapse_msc3916.synapse_adapter.probes import method

if TYPE_CHECKING:
    from synapse.server import HomeServer

NEEDS = [
    method("synapse.federation.transport.server._base.Authenticator.__init__", "X-Matrix checks", params=("hs",)),
    method("synapse.federation.transport.server._base.Authenticator.authenticate_request",
           "X-Matrix checks", params=("request", "content")),
    method("synapse.server.HomeServer.get_federation_ratelimiter", "per-origin federation rate limits"),
    method("synapse.util.ratelimitutils.FederationRateLimiter.ratelimit", "per-origin federation rate limits",
           params=("host",)),
]


def federation_authenticator(hs: HomeServer) -> Authenticator:
    return Authenticator(hs)


def federation_ratelimiter(hs: HomeServer) -> Any:
    return hs.get_federation_ratelimiter()
