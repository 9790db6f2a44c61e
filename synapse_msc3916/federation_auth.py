"""Federation requests the module serves behind X-Matrix, checked by Synapse itself.

MSC1902's ``remote_media`` is the legacy download behind request signing. Synapse has no
servlet for it, so the module asks Synapse's own ``Authenticator`` (keyring, notary servers,
key cache, ``federation_domain_whitelist``) and per-origin rate limiter, then hands the
request to Synapse's own resource. Answers to missing or bad signatures are therefore
Synapse's, word for word.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from synapse.module_api import make_deferred_yieldable, run_in_background
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from synapse_msc3916.synapse_adapter import ErrorResource

logger = logging.getLogger(__name__)


class SignedDispatchResource(Resource):
    """Checks X-Matrix with Synapse's ``Authenticator``, then hands over to a Synapse resource.

    Used for federation paths that Synapse serves only unauthenticated (MSC1902's
    ``remote_media`` is the legacy download behind request signing). Authentication,
    the domain whitelist and the per-origin rate limit are Synapse's; only the hand-over is
    ours. ``then(request, origin)`` returns the resource to render (or raises a
    SynapseError, rendered as JSON).
    """

    isLeaf = True

    def __init__(
        self,
        authenticator: Any,
        ratelimiter: Any,
        then: Callable[[Any, str], Resource],
    ):
        super().__init__()
        self._authenticator = authenticator
        self._ratelimiter = ratelimiter
        self._then = then

    def render(self, request: Any) -> Any:
        run_in_background(self._dispatch, request)
        return NOT_DONE_YET

    async def _dispatch(self, request: Any) -> None:
        try:
            origin = await self._authenticator.authenticate_request(request, None)
            with self._ratelimiter.ratelimit(origin) as wait:
                await wait
                target = self._then(request, origin)
                target.render(request)
                deferred = getattr(request, "render_deferred", None)
                if deferred is not None:
                    await make_deferred_yieldable(_shield(deferred))
        except Exception as e:  # rendered like any Synapse servlet error
            if request.startedWriting:
                logger.warning("synapse_msc3916: error after response started: %s", e)
                return
            ErrorResource(e).render(request)


def _shield(deferred: defer.Deferred) -> defer.Deferred:
    """A deferred that follows ``deferred`` without consuming its result."""
    out: defer.Deferred = defer.Deferred()

    def _done(result: Any) -> Any:
        out.callback(None)
        return result

    deferred.addBoth(_done)
    return out
