"""``AuthenticatedMediaModule``: the entry point admins put under ``modules:``.

It wires the pieces together: the route table (``routes.py``), the per-listener router
(``router.py``), the freeze policy (``freeze.py``), the client families (``clients.py``)
and the Synapse adapter (``synapse_adapter/``). Its one rule of its own is how the freeze
and Synapse's per-media ``authenticated`` flag combine on unauthenticated reads (``_gate``):
a media is refused when either refuses it, so the freeze is never weaker than Synapse.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from synapse.module_api import ModuleApi
from twisted.web.resource import Resource

from synapse_msc3916 import clients
from synapse_msc3916 import synapse_adapter as sa
from synapse_msc3916.config import ModuleConfig
from synapse_msc3916.federation_auth import SignedDispatchResource
from synapse_msc3916.freeze import Decision, FreezePolicy
from synapse_msc3916.media_times import MediaTimes
from synapse_msc3916.metrics import UNAUTHENTICATED_REQUESTS
from synapse_msc3916.router import SIGNED_ORIGIN_ATTR, ListenerRouter, RouterContext

logger = logging.getLogger(__name__)

FROZEN_ERROR = (
    "This media is only available on authenticated media endpoints"
    " (/_matrix/client/v1/media/...): authentication is required"
)


class AuthenticatedMediaModule:
    def __init__(self, config: ModuleConfig, api: ModuleApi):
        self._config = config
        self._api = api
        self.hs = sa.homeserver(api)
        self.versions_resource = sa.VersionsResource(self.hs, self._unstable_features())
        self.freeze: FreezePolicy | None = None
        now_ms = sa.current_time_msec(api)
        times = MediaTimes(api, now_ms)
        if config.freeze is not None:
            self.freeze = FreezePolicy(
                config.freeze,
                times.content_time,
                now_ms,
                auto_exempt=sa.sso_icon_media(self.hs),
                local_server_name=api.server_name,
                cache_size=config.freeze_cache_size,
            )
        # Media paths are routed only where Synapse serves media; /versions is answered
        # wherever clients ask it, so a main process in front of media workers
        # advertises what those workers serve.
        self.serves_media = sa.can_load_media_repo(self.hs)
        if self.serves_media:
            # Noted with or without a freeze block, so that a freeze configured later
            # judges media reserved with /create by when their content came.
            times.record_uploads()
            self._authenticator = sa.federation_authenticator(self.hs)
            self._ratelimiter = sa.federation_ratelimiter(self.hs)
            sa.fix_zero_byte_multipart()
            sa.install_media_gate(self._gate)
        if self.serves_media or self.advertises_features:
            context = RouterContext(
                hs=self.hs,
                serves_media=self.serves_media,
                advertises_features=self.advertises_features,
                versions_resource=self.versions_resource,
                feature_enabled=self.feature_enabled,
                signed_resource=self.signed_resource,
            )
            sa.install_routers(self.hs, lambda matrix, names: ListenerRouter(matrix, names, context))

    @staticmethod
    def parse_config(config: dict[str, Any]) -> ModuleConfig:
        sa.check_synapse()
        return ModuleConfig.parse(config)

    def feature_enabled(self, feature: str) -> bool:
        return bool(getattr(self._config, feature))

    def _unstable_features(self) -> dict[str, bool]:
        """What ``/versions`` adds; empty when both families are off (then untouched)."""
        features = {}
        if self._config.unstable_msc3916:
            features["org.matrix.msc3916"] = True
            features["org.matrix.msc3916.stable"] = True
        if self._config.msc1902:
            features["org.matrix.msc1902"] = True
        return features

    @property
    def advertises_features(self) -> bool:
        return bool(self._config.unstable_msc3916 or self._config.msc1902)

    def signed_resource(self, then: Callable[[Any, str], Resource]) -> Resource:
        return SignedDispatchResource(self._authenticator, self._ratelimiter, then)

    async def _gate(
        self, request: Any, server_name: str | None, media_id: str
    ) -> tuple[sa.Access, Callable[[sa.Read], None] | None]:
        """Decide an unauthenticated media read (see ``synapse_adapter.install_media_gate``).

        Returns what the read may do beyond Synapse's own choice (``sa.Access``: only a
        read the module authenticated may use signed federation; ``reopen_flagged_media``
        only lifts Synapse's flag), and a callback told how the read ended, which counts it.
        """
        client = clients.classify(_user_agent(request))
        if request is not None and getattr(request, SIGNED_ORIGIN_ATTR, None):
            # A federation read the module authenticated with X-Matrix: served like
            # Synapse's stable federation endpoints, whatever the flag or the date.
            return sa.Access.AUTHENTICATED, functools.partial(self._settle, client, Decision.EXEMPT, None, "")
        if self.freeze is None:
            # No freeze block: Synapse's own per-media flag decides.
            return sa.Access.SYNAPSE, functools.partial(self._settle, client, None, server_name, media_id)
        decision = await self.freeze.decide(server_name, media_id)
        if decision is Decision.REFUSE:
            UNAUTHENTICATED_REQUESTS.labels(client, "refused").inc()
            self.freeze.refused(server_name, media_id, client)
            raise sa.NotFoundError(FROZEN_ERROR)
        config = self.freeze.config
        # Only an explicit reopen_flagged_media lets the date serve what Synapse's flag
        # refuses, and never in report mode: a rehearsal must not widen access.
        reopen = (
            config.reopen_flagged_media
            and config.enforce
            and decision in (Decision.SERVE, Decision.EXEMPT)
        )
        access = sa.Access.REOPENED if reopen else sa.Access.SYNAPSE
        return access, functools.partial(self._settle, client, decision, server_name, media_id)

    def _settle(
        self,
        client: str,
        decision: Decision | None,
        server_name: str | None,
        media_id: str,
        read: sa.Read,
    ) -> None:
        """Count one unauthenticated read once Synapse has answered it.

        Only a read that really served the media counts as served, exempt or
        would_refuse: Synapse's own 404 for unknown media is ``not_served``.
        """
        if read is sa.Read.REFUSED:
            label = "refused"
        elif read is not sa.Read.SERVED:
            label = "not_served"
        elif decision is Decision.WOULD_REFUSE:
            label = "would_refuse"
            assert self.freeze is not None
            self.freeze.would_refuse(server_name, media_id, client)
        elif decision is Decision.EXEMPT:
            label = "exempt"
        else:
            label = "served"
        UNAUTHENTICATED_REQUESTS.labels(client, label).inc()


def _user_agent(request: Any) -> bytes | None:
    """The request's first ``User-Agent`` header, or None."""
    headers = getattr(request, "requestHeaders", None)
    if headers is None:
        return None
    values = headers.getRawHeaders(b"user-agent")
    return values[0] if values else None
