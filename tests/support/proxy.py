"""A byte-counting TCP proxy on loopback, run in a thread: put it in front of the registry to count
what clients (containerd, lazysnap) really download."""

from __future__ import annotations

import asyncio
import threading
from contextlib import suppress


class CountingProxy:
    """Forwards 127.0.0.1:port -> upstream; ``downstream_bytes`` counts bytes sent to clients."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.downstream_bytes = 0
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="counting-proxy", daemon=True)
        self._lock = threading.Lock()

    @classmethod
    def in_front_of(cls, host: str) -> CountingProxy:
        """A started proxy to ``host`` (``address:port``, as ``Registry.host`` gives it)."""
        address, _, port = host.rpartition(":")
        return cls(address, int(port)).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> CountingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def reset(self) -> int:
        with self._lock:
            count, self.downstream_bytes = self.downstream_bytes, 0
        return count

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while data := await src.read(65536):
                    if count:
                        with self._lock:
                            self.downstream_bytes += len(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                with suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def stop(self) -> None:
        """Stop listening (idempotent); the registry behind it is then unreachable."""
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
                with suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 2)

        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
