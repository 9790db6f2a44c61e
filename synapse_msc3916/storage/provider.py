"""``DedupStorageProvider``: stores each distinct media content once (placeholder)."""

from __future__ import annotations

from typing import Any

from synapse_msc3916 import synapse_adapter as sa
from synapse_msc3916.config import StorageConfig


class DedupStorageProvider:
    def __init__(self, hs: Any, config: StorageConfig):
        self._hs = hs
        self._config = config

    @staticmethod
    def parse_config(config: dict[str, Any]) -> StorageConfig:
        sa.check_synapse_version()
        return StorageConfig.parse(config)

    async def store_file(self, path: str, file_info: Any) -> None:
        return None

    async def fetch(self, path: str, file_info: Any) -> Any:
        return None
