"""Multipart seam: a fix for Synapse's ``multipart/mixed`` federation answer of empty files.

Synapse's ``MultipartFileConsumer`` (1.120 to at least 1.163) writes its JSON part and
file headers on the first ``write()``, which never comes for an empty file; the answer
then declares a ``Content-Length`` it never sends and the requesting server times out
with 502. Writing an empty chunk before the closing boundary fixes exactly that case.
"""

from __future__ import annotations

import functools

from synapse.media.media_storage import MultipartFileConsumer

from synapse_msc3916.synapse_adapter.probes import Need, method

NEEDS = [
    method("synapse.media.media_storage.MultipartFileConsumer.unregisterProducer", "the zero-byte fix"),
    method("synapse.media.media_storage.MultipartFileConsumer.write", "the zero-byte fix", params=("data",)),
    Need("synapse.media.media_storage.MultipartFileConsumer.__init__", "the zero-byte fix",
         check=lambda init: "self.file_headers_written" in _source(init)),
]


def _source(obj: object) -> str:
    import inspect

    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def fix_zero_byte_multipart() -> None:
    original = MultipartFileConsumer.unregisterProducer
    if getattr(original, "_msc3916_fixed", False):
        return

    @functools.wraps(original)
    def unregisterProducer(self: MultipartFileConsumer) -> None:
        if not self.file_headers_written:
            self.write(b"")
        original(self)

    unregisterProducer._msc3916_fixed = True  # type: ignore[attr-defined]
    MultipartFileConsumer.unregisterProducer = unregisterProducer  # type: ignore[method-assign]
