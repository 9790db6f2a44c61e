"""Prometheus counters, exported on Synapse's own ``/_synapse/metrics``.

They live in prometheus_client's default registry, which Synapse's metrics listener
serves. Names start with ``synapse_msc3916_`` so that they sort together.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MEDIA_REQUESTS = Counter(
    "synapse_msc3916_media_requests",
    "Media requests seen by the module's router, by endpoint family and kind.",
    ["family", "kind"],
)

FREEZE_DECISIONS = Counter(
    "synapse_msc3916_freeze_decisions",
    "Freeze decisions on unauthenticated media endpoints: refused (enforce mode),"
    " would_refuse (report mode), exempt.",
    ["decision", "origin"],
)

STORAGE_STORES = Counter(
    "synapse_msc3916_storage_stores", "Files handed to the dedup storage provider.", ["kind"]
)
STORAGE_DEDUP_HITS = Counter(
    "synapse_msc3916_storage_dedup_hits",
    "Stores whose content was already present, so no object bytes were written.",
)
STORAGE_BYTES_WRITTEN = Counter(
    "synapse_msc3916_storage_bytes_written", "Object bytes written to the blob store."
)
STORAGE_BYTES_SAVED = Counter(
    "synapse_msc3916_storage_bytes_saved", "Bytes not written because the content was present."
)
STORAGE_FETCHES = Counter(
    "synapse_msc3916_storage_fetches", "Fetches from the dedup store, by result.", ["result"]
)
STORAGE_FETCH_LATENCY = Histogram(
    "synapse_msc3916_storage_fetch_latency_seconds",
    "Time from a fetch call to the object being ready to stream.",
)
STORAGE_ERRORS = Counter(
    "synapse_msc3916_storage_errors",
    "Blob store errors (S3 or directory), by operation.",
    ["operation"],
)
STORAGE_CORRUPTIONS = Counter(
    "synapse_msc3916_storage_corruptions",
    "Objects whose size or SHA-256 did not match the index; they are no longer served.",
)
STORAGE_OBJECTS_DELETED = Counter(
    "synapse_msc3916_storage_objects_deleted",
    "Objects the deletion job removed from the blob store after their last media was"
    " deleted in Synapse (delete_after later).",
)
STORAGE_BYTES_DELETED = Counter(
    "synapse_msc3916_storage_bytes_deleted",
    "Bytes of the objects the deletion job removed from the blob store.",
)
STORAGE_DELETION_LEASE_HELD = Gauge(
    "synapse_msc3916_storage_deletion_lease_held",
    "1 on the media process that holds the deletion job's lease (the one running the"
    " job), 0 on the other media processes.",
)
STORAGE_HEALS = Counter(
    "synapse_msc3916_storage_heals",
    "Objects found missing or damaged (at read time, or by a store that verified its"
    " dedup hit) and rewritten by a later store of the same content.",
)
STORAGE_DAMAGED = Counter(
    "synapse_msc3916_storage_damaged_objects",
    "Indexed objects found missing or damaged, by where they were found and what was wrong.",
    ["where", "problem"],
)

# --- Who still uses the unauthenticated media endpoints (issue 13) ---
# `client` is one of clients.FAMILIES (a fixed set, whatever the User-Agent holds);
# `decision` is served, refused, would_refuse (report mode: served, enforce would
# refuse), exempt (the freeze's exempt list, or an X-Matrix-signed federation read) or
# not_served (Synapse answered without the media: unknown media, a failed fetch); the
# first, third and fourth count only reads answered with the media (or 304).
UNAUTHENTICATED_REQUESTS = Counter(
    "synapse_msc3916_unauthenticated_requests",
    "Media reads on unauthenticated endpoints (legacy and MSC1902 download/thumbnail),"
    " by client family (from the User-Agent) and decision.",
    ["client", "decision"],
)

STORAGE_REDIRECTS = Counter(
    "synapse_msc3916_storage_redirects",
    "Media reads answered with a presigned S3 URL instead of the bytes, by kind"
    " (download, thumbnail, federation).",
    ["kind"],
)
STORAGE_REDIRECTED_BYTES = Counter(
    "synapse_msc3916_storage_redirected_bytes",
    "Bytes of the media whose reads were redirected to S3 (sent by S3, not Synapse).",
)
