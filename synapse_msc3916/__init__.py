"""synapse-msc3916: authenticated media on every deployed path, a dated media freeze and
de-duplicated media storage, as a Synapse module and a media storage provider."""

from synapse_msc3916.module import AuthenticatedMediaModule
from synapse_msc3916.storage.provider import DedupStorageProvider

__all__ = ["AuthenticatedMediaModule", "DedupStorageProvider"]
__version__ = "0.1.0"
