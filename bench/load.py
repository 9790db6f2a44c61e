"""A small keep-alive HTTP/1.1 load generator on asyncio, so benchmarks need nothing else.

Each connection sends one request at a time and reads the whole answer (Content-Length,
chunked, or until the server closes); latencies are per request. Every answer that is
not the expected status, cannot be parsed or never comes is counted as an error, by kind,
and the connection is opened again: a round always finishes and says what went wrong, so
one bad answer cannot take a benchmark page down with it.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time
from collections.abc import Sequence

import attr

# How long past the end of the round a request may still take before it counts as lost.
GRACE_SECONDS = 30.0
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


@attr.s(frozen=True, auto_attribs=True)
class RoundResult:
    requests: int  # requests sent that got an answer or failed (connect failures included)
    seconds: float
    errors: int  # of those, the ones without the expected answer
    latencies_ms: list[float]  # expected answers only
    error_kinds: dict[str, int] = attr.Factory(dict)  # e.g. {"status 404": 3, "bad answer: ...": 1}

    @property
    def ok(self) -> int:
        return self.requests - self.errors

    @property
    def rate(self) -> float:
        """Expected answers per second: errors are not throughput."""
        return self.ok / self.seconds if self.seconds else 0.0


class BadAnswer(Exception):
    """The bytes the server sent are not an HTTP/1.x answer this client can frame."""


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    """Read and discard a chunked body, trailers included."""
    while True:
        size_line = (await reader.readuntil(b"\r\n"))[:-2].split(b";", 1)[0].strip()
        if not size_line or not set(size_line) <= HEX_DIGITS:
            raise BadAnswer(f"chunk size {size_line[:40]!r}")
        size = int(size_line, 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # a trailer field
            return
        await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadAnswer("no CRLF after a chunk")


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one whole answer; return (status, whether the connection can be used again).

    Raises BadAnswer for bytes that are not HTTP, asyncio.IncompleteReadError when the
    server closes mid-answer.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    status_text = rest[:3]
    if version not in (b"HTTP/1.0", b"HTTP/1.1") or len(status_text) != 3 or not status_text.isdigit():
        raise BadAnswer(f"status line {lines[0][:40]!r}")
    status = int(status_text)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadAnswer(f"header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    keep_alive = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
    encoding = headers.get(b"transfer-encoding", b"").lower()
    if encoding:
        if encoding.split(b",")[-1].strip() != b"chunked":
            raise BadAnswer(f"transfer-encoding {encoding[:40]!r}")
        await _read_chunked(reader)
    elif b"content-length" in headers:
        length = headers[b"content-length"]
        if not length.isdigit():
            raise BadAnswer(f"content-length {length[:40]!r}")
        await reader.readexactly(int(length))
    elif not (100 <= status < 200 or status in (204, 304)):
        await reader.read()  # no framing: the body runs until the server closes
        keep_alive = False
    return status, keep_alive


async def _connection(
    host: str, port: int, raw_requests: Sequence[bytes], deadline: float, expect: int,
    latencies: list[float], counts: collections.Counter[str],
) -> None:
    i = 0
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    try:
        while time.monotonic() < deadline:
            if streams is None:
                try:
                    streams = await asyncio.open_connection(host, port)
                except OSError:
                    counts["requests"] += 1
                    counts["connect failed"] += 1
                    await asyncio.sleep(0.05)  # a refused port must not spin the round
                    continue
            reader, writer = streams
            raw = raw_requests[i % len(raw_requests)]
            i += 1
            counts["requests"] += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(deadline - time.monotonic() + GRACE_SECONDS):
                    writer.write(raw)
                    status, keep_alive = await read_answer(reader)
            except (BadAnswer, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as e:
                # TimeoutError is an OSError. The connection is in an unknown state: drop it.
                kind = "no answer in time" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"[:80]
                counts[f"bad answer: {kind}"] += 1
                writer.close()
                streams = None
                continue
            if status == expect:
                latencies.append((time.perf_counter() - start) * 1000)
            else:
                counts[f"status {status}"] += 1
            if not keep_alive:
                writer.close()
                streams = None
    finally:
        if streams is not None:
            streams[1].close()


def run_round(
    host: str, port: int, paths: Sequence[str], headers: dict[str, str], concurrency: int, seconds: float,
    expect: int = 200,
) -> RoundResult:
    """GET ``paths`` in turn on ``concurrency`` keep-alive connections for ``seconds``.

    An answer with another status than ``expect`` is an error, as is anything unparsable.
    """
    header_text = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{header_text}\r\n".encode() for p in paths]
    latencies: list[float] = []
    counts: collections.Counter[str] = collections.Counter()

    async def main() -> float:
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(
            *(_connection(host, port, raw, deadline, expect, latencies, counts) for _ in range(concurrency))
        )
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    requests = counts.pop("requests", 0)
    return RoundResult(requests, elapsed, sum(counts.values()), latencies, dict(counts))


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
