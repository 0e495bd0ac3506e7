"""A real server on its own thread and event loop, for the demo, tests and benchmarks."""

from __future__ import annotations

import asyncio
import threading

from hmlstm.serving.config import ServeConfig
from hmlstm.serving.model import LoadedModel
from hmlstm.serving.server import SegmenterServer


class BackgroundServer:
    """``with BackgroundServer(model, config) as srv: ... srv.target``; stops gracefully on exit."""

    def __init__(self, model: LoadedModel, config: ServeConfig):
        self.model, self.config = model, config
        self.loop = asyncio.new_event_loop()
        self.server: SegmenterServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="hmlstm-server", daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()

        async def boot():
            self.server = SegmenterServer(self.model, self.config)
            await self.server.start()

        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(timeout=60)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"{self.config.host}:{self.port}"

    def call(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop (e.g. to inspect its registry)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace), timeout=(grace or self.config.grace_s) + 30)
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(grace=0.5)
