"""Streaming to slow clients (issue 18 item 14): time without progress is bounded, not
time per chunk.

The unit tests drive ``BlobResponder`` against a transport that behaves like Twisted's
(pauses its producer above 64 KiB buffered, resumes it once drained) on a fake clock;
the end-to-end tests read a download slowly through a real Synapse on real sockets.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from synapse_msc3916.storage.responder import BlobResponder
from tests.harness import SeaweedFS, Synapse, make_synapse, wait_for
from tests.storage_helpers import provider_entry, s3_config, wipe_local_media

KIB = 1024
MIB = 1024 * KIB


class SlowTransport:
    """A consumer with Twisted's producer protocol: ``pauseProducing`` once more than
    ``high_water`` bytes wait, ``resumeProducing`` once they have all gone out."""

    def __init__(self, high_water: int = 64 * KIB):
        self.high_water = high_water
        self.buffered = 0
        self.delivered = bytearray()
        self._pending = bytearray()
        self.producer: Any = None
        self.paused = False
        self.aborted = False
        self.unregistered = False
        self.transport = self  # BlobResponder._abort looks for consumer.transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True

    def write(self, data: bytes) -> None:
        assert not self.aborted
        self._pending += data
        if len(self._pending) > self.high_water and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def abortConnection(self) -> None:
        self.aborted = True

    def client_reads(self, n: int) -> None:
        """The client accepts ``n`` bytes; an emptied buffer resumes the producer."""
        taken = self._pending[:n]
        del self._pending[:n]
        self.delivered += taken
        if not self._pending and self.paused:
            self.paused = False
            self.producer.resumeProducing()


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.size = data, 0, len(data)

    def read(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def close(self) -> None:
        pass


async def _call(f: Any) -> Any:
    return f()


async def _wrap(aw: Any) -> Any:
    return await aw


def _stream(data: bytes, clock: Clock, transport: SlowTransport, **kwargs: Any) -> defer.Deferred:
    responder = BlobResponder(
        reader=Reader(data),
        read_in_thread=lambda f: defer.ensureDeferred(_call(f)),
        run_in_background=lambda f, *a: defer.ensureDeferred(f(*a)),
        make_yieldable=lambda d: d,
        reactor=clock,
        length=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        on_corrupt=lambda why: None,
        **kwargs,
    )
    return defer.ensureDeferred(_wrap(responder.write_to_consumer(transport)))


def test_a_slow_but_steady_client_gets_the_whole_download() -> None:
    """4 KiB/s, far below the old limit (1 MiB within 90 s, about 11.6 KB/s): the download
    takes 10 minutes of (fake) time and completes.

    Before the fix the first 1 MiB chunk went out in one write, the transport stayed
    paused until the client had read all of it (256 s), and the 90 s resume timeout
    aborted the download after 360 KiB."""
    data = os.urandom(2 * MIB + 100 * KIB)
    clock, transport = Clock(), SlowTransport()
    done = _stream(data, clock, transport)
    failures: list[Any] = []
    done.addErrback(failures.append)
    seconds = 0
    while not done.called and seconds < 3600:
        transport.client_reads(4 * KIB)
        clock.advance(1)
        seconds += 1
    assert not failures, failures
    assert not transport.aborted
    assert bytes(transport.delivered) + bytes(transport._pending) == data
    assert seconds > 500  # it really was slow: far longer than any per-chunk timeout


def test_a_client_that_stops_reading_is_dropped_after_the_stall_timeout() -> None:
    data = os.urandom(3 * MIB)
    clock, transport = Clock(), SlowTransport()
    done = _stream(data, clock, transport)
    failures: list[Any] = []
    done.addErrback(failures.append)
    for _ in range(15):  # some progress first: each second empties the send buffer
        transport.client_reads(200 * KIB)
        clock.advance(1)
    assert not done.called and transport.paused  # the next pieces wait for the client
    clock.advance(88)
    assert not done.called and not transport.aborted
    clock.advance(2)  # 90 s since the client last took bytes
    assert transport.aborted and failures
    assert failures[0].check(TimeoutError)
    assert len(transport.delivered) < len(data)


def test_stall_timeout_config() -> None:
    from synapse.module_api.errors import ConfigError

    from synapse_msc3916.config import StorageConfig

    s3 = {"backend": "s3", "bucket": "media"}
    assert StorageConfig.parse(s3).stall_timeout_ms == 90_000
    assert StorageConfig.parse({**s3, "stall_timeout": "5m"}).stall_timeout_ms == 300_000
    file = {"backend": "file", "directory": "/tmp/x", "stall_timeout": 30}
    assert StorageConfig.parse(file).stall_timeout_ms == 30_000
    for bad in ("0s", "500ms", "soon", True):
        with pytest.raises(ConfigError, match="^synapse_msc3916: stall_timeout: "):
            StorageConfig.parse({**s3, "stall_timeout": bad})


# --- end to end: real Synapse, real sockets -------------------------------------------

STALL_TIMEOUT = "2s"


@pytest.fixture(scope="module")
def slow_hs(tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFS) -> Iterator[Synapse]:
    seaweedfs.create_bucket("slow-clients")
    hs = make_synapse(tmp_path_factory.mktemp("slow-clients"), storage_providers=[provider_entry(
        s3_config(seaweedfs, "slow-clients", stall_timeout=STALL_TIMEOUT))]).start()
    try:
        yield hs
    finally:
        hs.stop()


def _open_download(hs: Synapse, token: str, media_id: str) -> tuple[socket.socket, int, bytes]:
    """A GET on a socket that can take little at a time: a small receive buffer, and a small
    MSS so that Synapse's kernel does not absorb the whole answer in its send buffer.
    Returns the socket, the Content-Length and the body bytes read with the headers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KIB)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1024)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", hs.port))
    path = f"/_matrix/client/v1/media/download/{hs.server_name}/{media_id}"
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {hs.server_name}\r\nAuthorization: Bearer {token}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        more = sock.recv(4096)
        assert more, head
        head += more
    head, body = head.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    return sock, length, body


def _read_rest(sock: socket.socket, body: bytes, per_tick: int, tick: float) -> bytes:
    """Read to EOF taking at most ``per_tick`` bytes every ``tick`` seconds."""
    received = bytearray(body)
    try:
        while True:
            budget = per_tick
            while budget > 0:
                data = sock.recv(budget)
                if not data:
                    return bytes(received)
                received += data
                budget -= len(data)
            time.sleep(tick)
    except (ConnectionResetError, TimeoutError):
        return bytes(received)
    finally:
        sock.close()


@pytest.mark.single_process  # the workers topology's test proxy buffers whole answers
def test_a_slow_client_reads_a_whole_download_through_synapse(slow_hs: Synapse) -> None:
    """About 256 KB/s against a 2 s stall timeout (a pause now ends once the client took
    at most 128 KiB, half a second here). The old code wrote 1 MiB at a time and
    needed the client to take each MiB within the timeout (512 KB/s here; 11.6 KB/s with
    the default 90 s): once the kernel's buffers were full it dropped the download (checked
    with 1 MiB writes: 685269 of 2400000 bytes arrived, "took no bytes for 2 seconds")."""
    token = slow_hs.register("snail")
    data = os.urandom(2_400_000)  # chunks beyond what the kernel's buffers absorb
    media_id = slow_hs.upload(token, data)
    wipe_local_media(slow_hs)  # streamed by the provider, not from Synapse's local copy
    sock, length, body = _open_download(slow_hs, token, media_id)
    assert length == len(data)
    started = time.monotonic()
    got = _read_rest(sock, body, 16 * KIB, 0.0625)
    print(f"read {len(got)} bytes in {time.monotonic() - started:.1f} s")
    assert len(got) == len(data) and got == data
    assert "took no bytes" not in slow_hs.log_file.read_text()


@pytest.mark.single_process  # the workers topology's test proxy buffers whole answers
def test_a_client_that_stops_reading_is_dropped(slow_hs: Synapse) -> None:
    token = slow_hs.register("stone")
    data = os.urandom(3 * MIB)
    media_id = slow_hs.upload(token, data)
    wipe_local_media(slow_hs)
    sock, length, body = _open_download(slow_hs, token, media_id)
    wait_for(lambda: "the client took no bytes for 2 seconds" in slow_hs.log_file.read_text(),
             30, "the stalled download to be dropped")
    got = _read_rest(sock, body, 1 * MIB, 0)
    assert len(got) < length
