"""Streaming a blob to Synapse's consumer.

Memory is bounded to two chunks per response, and no thread is held for the length of
a download: each chunk is read (and hashed) by one short call on the provider's thread
pool, one chunk ahead of the one being sent, and no further read starts while the
consumer is paused. A client that reads slowly therefore costs an open S3 connection,
never a blocked thread.

A chunk goes to the consumer in ``WRITE_SIZE`` pieces, waiting while the consumer is
paused. Twisted pauses a producer once more than 64 KiB wait to be sent and resumes it
once they have all gone to the kernel, so every resume proves the client took bytes: the
stall timeout bounds the time *without progress* (no resume for ``stall_timeout``
seconds), never the length of a download. A 1 MiB write would instead need the client
to take the whole MiB within the timeout.

Content is verified as it streams. The final chunk is held back until the SHA-256 of
everything before it plus itself matches the index, so a corrupt blob never produces a
complete, well-formed response: the connection is dropped instead, the blob is marked
corrupt and is not served again.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from synapse_msc3916.metrics import STORAGE_ERRORS
from synapse_msc3916.storage.blobstore import BlobReader
from synapse_msc3916.synapse_adapter import Responder

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
# Twisted's transport buffer size: a pause ends once the client has taken at most two
# writes (128 KiB); smaller writes cost reactor time on fast downloads.
WRITE_SIZE = 64 << 10
STALL_TIMEOUT_SECONDS = 90.0


class CorruptBlob(Exception):
    """The bytes read did not match the index's length or SHA-256."""


def _read_and_hash(reader: BlobReader, n: int, digest: Any) -> bytes:
    """One read plus its hash, run on a pool thread (hashlib releases the GIL)."""
    chunk = reader.read(n)
    digest.update(chunk)
    return chunk


@implementer(IPushProducer)
class BlobResponder(Responder):
    def __init__(
        self,
        *,
        reader: BlobReader,
        read_in_thread: Callable[[Callable[[], bytes]], Awaitable[bytes]],
        run_in_background: Callable[..., Any],
        make_yieldable: Callable[[defer.Deferred], Awaitable[Any]],
        reactor: Any,
        length: int,
        sha256: str | None,
        on_corrupt: Callable[[str], None],
        chunk_size: int = CHUNK_SIZE,
        prefetched: tuple[bytes, Any] | None = None,
        stall_timeout: float = STALL_TIMEOUT_SECONDS,
        write_size: int = WRITE_SIZE,
    ):
        """``sha256=None`` streams without verification (legacy objects, whose content
        nothing recorded). ``prefetched`` is the start of the blob already read, with
        the SHA-256 hash object that has consumed it."""
        self._reader = reader
        self._read_in_thread = read_in_thread
        self._run_in_background = run_in_background
        self._make_yieldable = make_yieldable
        self._reactor = reactor
        self._length = length
        self._sha256 = sha256
        self._on_corrupt = on_corrupt
        self._chunk_size = chunk_size
        self._stall_timeout = stall_timeout
        self._write_size = write_size
        # A twisted IConsumer (typed Any: mypy cannot check zope interfaces)
        self._consumer: Any = None
        self._paused = False
        self._resume: defer.Deferred | None = None
        self._stopped = False
        self._done: defer.Deferred = defer.Deferred()
        self._in_flight: defer.Deferred | None = None
        self._prefetched = prefetched

    # --- Responder ---

    def write_to_consumer(self, consumer: Any) -> Awaitable[Any]:
        if getattr(consumer, "method", None) == b"HEAD":
            # Twisted sends a HEAD answer's headers and drops its body: reading the
            # object from S3 only to throw it away would cost its whole length.
            self._done.callback(None)
            return self._make_yieldable(self._done)
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._run_in_background(self._pump)
        return self._make_yieldable(self._done)

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        self._stopped = True
        self._wake()
        in_flight = self._in_flight
        if in_flight is not None and not in_flight.called:
            # Never close the body under a pool thread still reading it.
            in_flight.addBoth(lambda _: self._reader.close())
        else:
            self._reader.close()

    # --- IPushProducer ---

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        self._stopped = True
        self._wake()

    def _wake(self) -> None:
        resume, self._resume = self._resume, None
        if resume is not None and not resume.called:
            resume.callback(None)

    # --- the loop ---

    async def _wait_until_resumed(self) -> None:
        """Wait while paused; each wait is timed afresh, as a resume is progress."""
        while self._paused and not self._stopped:
            self._resume = defer.Deferred()
            self._resume.addTimeout(self._stall_timeout, self._reactor)
            try:
                await self._make_yieldable(self._resume)
            except defer.TimeoutError:
                raise TimeoutError(
                    f"the client took no bytes for {self._stall_timeout:g} seconds"
                ) from None

    async def _send(self, chunk: bytes, last: bool) -> None:
        """Write ``chunk`` in pieces, each once the consumer is ready for more, and (unless
        it is the last) wait until the consumer is ready for the next chunk: no read
        starts beyond the one already ahead while the client is slow."""
        step = self._write_size
        for start in range(0, len(chunk), step):
            if self._stopped:
                return
            assert self._consumer is not None
            self._consumer.write(chunk[start : start + step] if len(chunk) > step else chunk)
            if self._paused and not (last and start + step >= len(chunk)):
                await self._wait_until_resumed()

    def _start_read(self, sent: int, digest: Any) -> defer.Deferred | None:
        """Start reading (and hashing) the chunk after ``sent`` bytes on the pool."""
        want = min(self._chunk_size, self._length - sent)
        if want <= 0:
            return None
        # Hashing 1 MiB takes about as long as sending it: do it on the pool thread,
        # next to the read, not on the reactor.
        d: defer.Deferred = self._run_in_background(
            self._read_in_thread, functools.partial(_read_and_hash, self._reader, want, digest)
        )
        self._in_flight = d
        return d

    async def _pump(self) -> None:
        digest: Any = hashlib.sha256()
        sent = 0
        pending: defer.Deferred | None = None
        try:
            if self._prefetched is not None:
                first, digest = self._prefetched
                self._prefetched = None
                pending = defer.succeed(first)
            else:
                pending = self._start_read(sent, digest)
            while not self._stopped:
                chunk = b""
                if pending is not None:
                    chunk = await self._make_yieldable(pending)
                    pending = None
                    if self._stopped:
                        break
                    if not chunk:
                        raise CorruptBlob(f"truncated after {sent} of {self._length} bytes")
                sent += len(chunk)
                if sent == self._length:
                    if self._sha256 is not None and digest.hexdigest() != self._sha256:
                        raise CorruptBlob(
                            f"SHA-256 is {digest.hexdigest()}, the index says {self._sha256}"
                        )
                # Read one chunk ahead while this one goes out: the S3 read and the hash
                # overlap the reactor's socket writes. At most two chunks are in memory.
                if sent < self._length:
                    pending = self._start_read(sent, digest)
                await self._send(chunk, last=sent >= self._length)
                if sent >= self._length:
                    break
            self._finish(None)
        except CorruptBlob as e:
            self._on_corrupt(str(e))
            self._abort()
            self._finish(e)
        except Exception as e:
            STORAGE_ERRORS.labels(operation="stream").inc()
            logger.warning("synapse_msc3916: streaming a stored file failed: %s", e)
            self._abort()
            self._finish(e)
        finally:
            if pending is not None:
                pending.addErrback(lambda _: None)  # abandoned read-ahead: its error is moot

    def _abort(self) -> None:
        """Drop the client's connection: a response with missing bytes must not look whole."""
        transport = getattr(self._consumer, "transport", None)
        if transport is None:
            wrapped = getattr(self._consumer, "wrapped_consumer", None)
            transport = getattr(wrapped, "transport", None)
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()

    def _finish(self, error: Exception | None) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterProducer()
        if not self._done.called:
            if error is None:
                self._done.callback(None)
            else:
                self._done.errback(error)
