"""``AuthenticatedMediaModule``: the entry point admins put under ``modules:``.

It wires the pieces together and holds no logic of its own: the route table
(``routes.py``), the per-listener router (``router.py``), the freeze policy
(``freeze.py``) and the Synapse adapter (``synapse_adapter.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from synapse.module_api import ModuleApi
from twisted.web.resource import Resource

from synapse_msc3916 import synapse_adapter as sa
from synapse_msc3916.config import ModuleConfig
from synapse_msc3916.federation_auth import SignedDispatchResource
from synapse_msc3916.freeze import Decision, FreezePolicy
from synapse_msc3916.media_times import MediaTimes
from synapse_msc3916.router import SIGNED_ORIGIN_ATTR, ListenerRouter

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
        if config.freeze is not None:
            times = MediaTimes(api)
            self.freeze = FreezePolicy(
                config.freeze,
                times.created_ts,
                sa.current_time_msec(api),
                auto_exempt=sa.sso_icon_media(self.hs),
                local_server_name=api.server_name,
                cache_size=config.freeze_cache_size,
            )
        # Media paths are routed only where Synapse serves media; /versions is answered
        # wherever clients ask it, so a main process in front of media workers
        # advertises what those workers serve.
        self.serves_media = sa.can_load_media_repo(self.hs)
        if self.serves_media:
            self._authenticator = sa.federation_authenticator(self.hs)
            self._ratelimiter = sa.federation_ratelimiter(self.hs)
            sa.fix_zero_byte_multipart()
            sa.install_media_gate(self._gate)
        if self.serves_media or self.advertises_features:
            sa.install_routers(self.hs, lambda matrix, names: ListenerRouter(matrix, names, self))

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

    async def _gate(self, request: Any, server_name: str | None, media_id: str) -> bool:
        """Decide an unauthenticated media read (see ``synapse_adapter.install_media_gate``)."""
        if request is not None and getattr(request, SIGNED_ORIGIN_ATTR, None):
            return True  # a federation read the module authenticated with X-Matrix
        if self.freeze is None:
            return False  # no freeze block: Synapse's own per-media flag decides
        decision = await self.freeze.decide(server_name, media_id)
        if decision is Decision.REFUSE:
            raise sa.NotFoundError(FROZEN_ERROR)
        # With a freeze block the date decides, not Synapse's per-media flag.
        return True
