"""Helpers for tests that kill servers: real processes, real stores, closed-loop clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(target) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
        except grpc.RpcError:
            time.sleep(0.1)
    raise TimeoutError(f"no server at {target}")


def health(target: str, service: str = "") -> str:
    """The server's health status for ``service``, by name."""
    with grpc.insecure_channel(target) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def store_health(target: str) -> str:
    return health(target, "hmlstm.v1.StateStore")


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; the deadline is generous (a loaded 2-core machine), never a sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g}s for {what}")
        time.sleep(0.05)


class ServerProcess:
    def __init__(self, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(self.port),
                                      "--metrics-port", "-1", *args], stderr=subprocess.PIPE, text=True)
        wait_serving(self.target)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class RedisProcess:
    def __init__(self, port: int | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:  # closed now, not whenever the garbage collector gets to it: tests count the server's clients
            client.close()

    def pause(self) -> None:  # a hung store: connections open, nothing answers
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(timeout=10)


class OpenStream:
    """One streaming call held open from asyncio: send a chunk, get its response (closed loop)."""

    def __init__(self, channel, stream_id: str, resume: bool = False, offset: int = 0):
        self.offset = offset
        self.responses: list = []
        self._queue: asyncio.Queue = asyncio.Queue()

        async def requests():
            yield pb.SegmentRequest(config=pb.StreamConfig(stream_id=stream_id, resume=resume, resume_offset=offset))
            while (text := await self._queue.get()) is not None:
                yield pb.SegmentRequest(chunk=pb.TextChunk(offset=self.offset, text=text))
                self.offset += len(text)

        self.call = pb_grpc.SegmenterStub(channel).StreamSegment(requests())

    async def send(self, text: str):
        await self._queue.put(text)
        r = await self.call.read()
        if r == grpc.aio.EOF:
            raise EOFError("the call ended")
        self.responses.append(r)
        return r

    async def close(self) -> list:
        await self._queue.put(None)
        while (r := await self.call.read()) != grpc.aio.EOF:
            self.responses.append(r)
        return self.responses


async def stream_until_broken(target: str, stream_id: str, text: str, chunk: int, start: int = 0,
                              resume: bool = False, pause: float = 0.0, options=(), on_channel=None):
    """Closed loop: send a chunk, wait for its response. Returns (responses, broke).

    options: channel options; on_channel(ModelInfo), if given, is told which server answered first.
    """
    responses = []
    queue: asyncio.Queue = asyncio.Queue()

    async def requests():
        yield pb.SegmentRequest(config=pb.StreamConfig(stream_id=stream_id, resume=resume, resume_offset=start))
        while (item := await queue.get()) is not None:
            yield pb.SegmentRequest(chunk=pb.TextChunk(offset=item[0], text=item[1]))

    async with grpc.aio.insecure_channel(target, options=list(options)) as ch:
        stub = pb_grpc.SegmenterStub(ch)
        if on_channel is not None:
            on_channel(await stub.DescribeModel(pb.DescribeModelRequest()))
        call = stub.StreamSegment(requests())
        try:
            for off in range(start, len(text), chunk):
                await queue.put((off, text[off : off + chunk]))
                r = await call.read()
                if r == grpc.aio.EOF:
                    return responses, True
                responses.append(r)
                if pause:
                    await asyncio.sleep(pause)
            await queue.put(None)
            while (r := await call.read()) != grpc.aio.EOF:
                responses.append(r)
        except grpc.RpcError:
            return responses, True
    return responses, False


def fold(responses):
    bounds, segs = {}, []
    for r in responses:
        for lb in r.boundaries:
            bounds.setdefault(lb.layer, []).extend(lb.offsets)
        segs += [(s.layer, s.start, s.end, s.text) for s in r.segments if s.final]
    return bounds, sorted(segs)


def unary(target: str, text: str):
    with grpc.insecure_channel(target) as ch:
        r = pb_grpc.SegmenterStub(ch).Segment(pb.SegmentTextRequest(text=text))
    return {lb.layer: list(lb.offsets) for lb in r.boundaries}, sorted(
        (s.layer, s.start, s.end, s.text) for s in r.segments)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
