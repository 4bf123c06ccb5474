"""TCP proxies in front of RabbitMQ, for what a broker does to its clients without restarting it
(other test sessions on this machine share the one broker).

- :class:`StallingProxy`: a pause switch: the broker stays up but its answers stop arriving.
- :class:`DroppingProxy`: drops every connection and refuses new ones for a while: what a broker
  restart does to its clients (their unacked messages go back to their queues as the connections close).
"""

from __future__ import annotations

import asyncio
import threading
import time


class StallingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self.flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


class DroppingProxy:
    """Runs on an event loop of its own, in a thread, so the broker traffic of every process behind it
    never waits for the caller's loop (a test's or a benchmark's, busy with its own requests).

    Parameters:
      target_host, target_port: the broker.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cuts = 0
        self.refused = 0
        self._refuse_until = 0.0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="dropping-proxy")

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._client, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self, seconds: float) -> int:
        """Drop every connection now (both sides see it closed) and refuse new ones for ``seconds``;
        returns how many connections were dropped."""
        async def drop() -> int:
            self._refuse_until = time.monotonic() + seconds
            self.cuts += 1
            dropped = list(self._open)
            for writer in dropped:
                writer.transport.abort()
            return len(dropped)

        return asyncio.run_coroutine_threadsafe(drop(), self._loop).result(10) // 2

    def reopen(self) -> None:
        """Take connections again now (a cut's refusal ends early)."""
        self._refuse_until = 0.0

    @property
    def connections(self) -> int:
        """Client connections open through the proxy."""
        return len(self._open) // 2

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shut() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            self.refused += 1
            writer.transport.abort()  # the broker is "down": the client sees its connection fail at once
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()  # one side gone: so is the other, as when the broker drops a client

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open -= {writer, up_writer}
