"""Creation times of media, read from Synapse's own tables through the module API."""

from __future__ import annotations

from synapse.module_api import ModuleApi


class MediaTimes:
    def __init__(self, api: ModuleApi):
        self._api = api

    async def created_ts(self, server_name: str | None, media_id: str) -> int | None:
        """``created_ts`` of local media, or of the first caching of remote media."""
        if server_name is None:
            sql = "SELECT created_ts FROM local_media_repository WHERE media_id = ?"
            args: tuple[str, ...] = (media_id,)
        else:
            sql = "SELECT created_ts FROM remote_media_cache WHERE media_origin = ? AND media_id = ?"
            args = (server_name, media_id)

        def txn(txn):  # type: ignore[no-untyped-def]
            txn.execute(sql, args)
            row = txn.fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._api.run_db_interaction("msc3916_media_created_ts", txn)
