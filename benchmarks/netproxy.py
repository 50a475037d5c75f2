"""A TCP proxy on 127.0.0.1 in front of an S3 server: a WAN-like link, or a faulty one.

This kernel has no ``netem`` qdisc, so delay cannot come from ``tc``; the proxy adds it.

* **WAN profile** (``ttfb``, ``rate``): every HTTP request waits ``ttfb`` seconds before it
  is passed on (time to first byte), and each connection's answers are paced to ``rate``
  bytes/s. More connections in flight get more bandwidth, as against S3.
* **Faults** (``p_delay``, ``p_truncate``, ``p_reset``, per 64 KiB piece of an answer):
  a pause of up to ``max_delay`` seconds, a clean close in the middle of an answer (the
  client sees a short body), or a reset (RST).
* ``down = True`` refuses every new connection and cuts the open ones (an outage).

Counters (``stats``) say how many faults were injected. Runs its own event loop thread.
"""
from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading

_METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")
PIECE = 64 << 10


class NetProxy:
    def __init__(self, upstream_port: int, *, ttfb: float = 0.0, rate: float = 0.0,
                 p_delay: float = 0.0, max_delay: float = 0.5, p_truncate: float = 0.0,
                 p_reset: float = 0.0, seed: int | None = None):
        self.upstream_port = upstream_port
        self.ttfb, self.rate = ttfb, rate
        self.p_delay, self.max_delay, self.p_truncate, self.p_reset = p_delay, max_delay, p_truncate, p_reset
        self.down = False
        self.rng = random.Random(seed)
        self.stats = {"connections": 0, "requests": 0, "delays": 0, "truncations": 0, "resets": 0,
                      "bytes": 0}
        self._loop = asyncio.new_event_loop()
        self._conns: set = set()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = fut.result(10)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        return self._server.sockets[0].getsockname()[1]

    def set(self, **kw) -> None:
        for k, v in kw.items():
            if not hasattr(self, k):
                raise AttributeError(k)
            setattr(self, k, v)
        if kw.get("down"):
            self._loop.call_soon_threadsafe(self._cut_all)

    def _cut_all(self) -> None:
        for w in list(self._conns):
            _reset(w)

    async def _handle(self, creader, cwriter) -> None:
        if self.down:
            _reset(cwriter)
            return
        self.stats["connections"] += 1
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", self.upstream_port,
                                                             limit=1 << 20)
        except OSError:
            _reset(cwriter)
            return
        self._conns.update((cwriter, swriter))
        up = asyncio.ensure_future(self._pump_up(creader, swriter))
        down = asyncio.ensure_future(self._pump_down(sreader, cwriter))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            for w in (cwriter, swriter):
                self._conns.discard(w)
                if not w.is_closing():
                    w.close()

    async def _pump_up(self, reader, writer) -> None:
        while True:
            data = await reader.read(PIECE)
            if not data:
                writer.write_eof() if writer.can_write_eof() else None
                return
            if data.startswith(_METHODS):
                self.stats["requests"] += 1
                if self.ttfb:
                    await asyncio.sleep(self.ttfb)
            writer.write(data)
            await writer.drain()

    async def _pump_down(self, reader, writer) -> None:
        rng = self.rng
        while True:
            data = await reader.read(PIECE)
            if not data:
                return
            if self.down:
                _reset(writer)
                return
            if self.p_reset and rng.random() < self.p_reset:
                self.stats["resets"] += 1
                writer.write(data[:rng.randrange(len(data) + 1)])
                _reset(writer)
                return
            if self.p_truncate and rng.random() < self.p_truncate:
                self.stats["truncations"] += 1
                writer.write(data[:rng.randrange(len(data) + 1)])
                await writer.drain()
                writer.close()
                return
            if self.p_delay and rng.random() < self.p_delay:
                self.stats["delays"] += 1
                await asyncio.sleep(rng.uniform(0, self.max_delay))
            writer.write(data)
            self.stats["bytes"] += len(data)
            await writer.drain()
            if self.rate:
                await asyncio.sleep(len(data) / self.rate)

    def close(self) -> None:
        async def stop():
            self._server.close()
            self._cut_all()
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:  # the connection handlers: ended here, not destroyed pending
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        except Exception:  # noqa: BLE001
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reset(writer) -> None:
    """Close with a TCP RST (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()
