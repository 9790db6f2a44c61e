"""A small keep-alive HTTP/1.1 load generator on asyncio, so benchmarks need nothing else.

Each connection sends one request at a time and reads the whole answer (Content-Length
bodies only, which is what Synapse sends for media); latencies are per request.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence

import attr


@attr.s(frozen=True, auto_attribs=True)
class RoundResult:
    requests: int
    seconds: float
    errors: int
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def _connection(
    host: str, port: int, raw_requests: Sequence[bytes], deadline: float,
    latencies: list[float], counters: list[int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.monotonic() < deadline:
            raw = raw_requests[i % len(raw_requests)]
            i += 1
            start = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            latencies.append((time.perf_counter() - start) * 1000)
            counters[0] += 1
            if status != 200:
                counters[1] += 1
    finally:
        writer.close()


def run_round(
    host: str, port: int, paths: Sequence[str], headers: dict[str, str], concurrency: int, seconds: float
) -> RoundResult:
    header_text = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    raw = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{header_text}\r\n".encode() for p in paths]
    latencies: list[float] = []
    counters = [0, 0]

    async def main() -> float:
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(
            *(_connection(host, port, raw, deadline, latencies, counters) for _ in range(concurrency))
        )
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    return RoundResult(counters[0], elapsed, counters[1], latencies)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
