"""A TCP pass-through on 127.0.0.1 that adds a fixed round-trip time, like a real S3 region.

Every chunk read from either side is forwarded to the other ``rtt / 2`` seconds after it
arrived: each request and each response pays the delay once, while a long body streams
at full speed behind its first byte (chunks are timestamped and queued, not slept on one
after the other). Runs an asyncio loop in a daemon thread of the benchmark process.
"""

from __future__ import annotations

import asyncio
import threading
import time


class LatencyProxy:
    def __init__(self, upstream_host: str, upstream_port: int, rtt: float):
        self.upstream = (upstream_host, upstream_port)
        self.delay = rtt / 2
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> LatencyProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self.port = future.result(10)
        return self

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay, data))
            queue.put_nowait((time.monotonic() + self.delay, b""))

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            try:
                writer.write_eof()
            except (OSError, RuntimeError):
                pass

        try:
            await asyncio.gather(read(), write())
        except (ConnectionError, OSError):
            writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self._pipe(client_r, up_w), self._pipe(up_r, client_w), return_exceptions=True
        )
        for w in (client_w, up_w):
            w.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
