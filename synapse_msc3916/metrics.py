"""Prometheus counters, exported on Synapse's own ``/_synapse/metrics``.

They live in prometheus_client's default registry, which Synapse's metrics listener
serves. Names start with ``synapse_msc3916_`` so that they sort together.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
