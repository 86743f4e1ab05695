"""A loopback TCP proxy that injects network faults between two hops (gateway -> sidecar, sidecar -> engine).

It runs its own asyncio loop in a thread, so a synchronous test can change
its faults while requests flow through it:

- ``delay_s``: every chunk from the upstream waits this long before it is
  passed on (a slow or congested link);
- ``reset_requests``: a connection is reset (RST) as soon as a request arrives
  on it, before any response byte (a peer that vanishes; the caller may retry);
- ``cut_streams_after``: once a response on a connection is an SSE stream,
  the connection is reset after this many more bytes (a link that breaks
  mid-stream; the caller must say so, not truncate silently).

Each proxied connection gets its own upstream connection; ``connections`` and
``dropped`` count what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class FaultProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.delay_s = 0.0
        self.reset_requests = False
        self.cut_streams_after: int | None = None
        self.connections = 0
        self.dropped = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0), self._loop
        ).result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def heal(self) -> None:
        self.delay_s = 0.0
        self.reset_requests = False
        self.cut_streams_after = None

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        def drop() -> None:
            self.dropped += 1
            writer.transport.abort()
            up_writer.transport.abort()

        async def requests() -> None:
            while data := await reader.read(65536):
                if self.reset_requests:
                    return drop()
                up_writer.write(data)
                await up_writer.drain()

        async def responses() -> None:
            left: int | None = None  # bytes still allowed through once an SSE stream started
            while data := await up_reader.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if left is None and self.cut_streams_after is not None and b"text/event-stream" in data:
                    left = self.cut_streams_after
                if left is not None:
                    if len(data) >= left:
                        writer.write(data[:left])
                        return drop()
                    left -= len(data)
                writer.write(data)
                await writer.drain()

        pumps = [asyncio.create_task(requests()), asyncio.create_task(responses())]
        with contextlib.suppress(OSError):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()
