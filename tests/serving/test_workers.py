"""`hmlstm serve --workers N`: processes sharing one port, a killed worker, resumes on another."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from hmlstm.serving.config import ServeConfig
from hmlstm.serving.ports import bind_socket, check_port_free
from hmlstm.serving.workers import worker_config
from hmlstm.v1 import segmenter_pb2 as pb
from hmlstm.v1 import segmenter_pb2_grpc as pb_grpc
from tests.serving.durable import fold, free_port, stream_until_broken, unary, wait_serving
from tests.serving.test_durability import texts

FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a new TCP connection per channel, so the kernel picks a worker


def worker_of(target: str) -> tuple[int, int]:
    with grpc.insecure_channel(target, FRESH) as ch:
        info = pb_grpc.SegmenterStub(ch).DescribeModel(pb.DescribeModelRequest(), timeout=5)
    return info.worker, info.worker_pid


def test_worker_configs_share_the_port_and_spread_the_metrics_ports():
    base = ServeConfig(port=0, metrics_port=9464, workers=3)
    configs = [worker_config(base, i, 5000) for i in range(3)]
    assert [c.metrics_port for c in configs] == [9464, 9465, 9466]
    assert all(c.port == 5000 and c.reuse_port and c.workers == 1 for c in configs)
    assert worker_config(ServeConfig(metrics_port=None), 2, 1).metrics_port is None


def test_a_port_someone_holds_is_refused_even_by_a_port_sharing_socket():
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC servers bind by default
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
    with bind_socket("127.0.0.1", 0, reuse_port=True) as s:  # what the supervisor holds
        with pytest.raises(OSError, match="already in use"):
            check_port_free("127.0.0.1", s.getsockname()[1])


def test_kill_one_of_two_workers_and_its_streams_resume_on_the_other(tiny_onnx, tmp_path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", str(tiny_onnx.path), "--workers", "2",
                             "--port", str(port), "--metrics-port", "-1", "--state-store",
                             f"sqlite:{tmp_path / 'streams.db'}", "--idle-timeout", "60"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(target)
        pids = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2:  # both workers up and reachable
            pids.add(worker_of(target)[1])
            assert time.monotonic() < deadline, "the second worker never answered"
        bodies = texts(40, length=200)
        ids: list[str] = []
        served_by: dict[str, int] = {}
        victim: list[int] = []

        async def run_all():
            async def one(sid, body):
                return await stream_until_broken(target, sid, body, 10, pause=0.03, options=FRESH,
                                                 on_channel=lambda info: served_by.__setitem__(sid, info.worker_pid))

            tasks = []

            def start():
                ids.append(f"w{len(ids)}")
                tasks.append(asyncio.create_task(one(ids[-1], bodies[len(ids) - 1])))

            for _ in range(8):
                start()
            while True:  # the kernel picks a worker per connection: open more until both serve a stream
                while len(served_by) < len(ids):
                    await asyncio.sleep(0.01)
                if len(set(served_by.values())) == 2 or len(ids) == len(bodies):
                    break
                start()
            await asyncio.sleep(0.25)  # a fault injected mid-stream (not an assertion on time)
            victim.append(served_by[ids[0]])
            os.kill(victim[0], signal.SIGKILL)
            return await asyncio.gather(*tasks)

        first = asyncio.run(run_all())
        bodies = bodies[: len(ids)]
        assert len(set(served_by.values())) == 2, "40 connections all reached one worker"
        broken = [i for i, (_, broke) in enumerate(first) if broke]
        assert broken and all(served_by[ids[i]] == victim[0] for i in broken)

        async def resume_all():
            out = {}
            for i in broken:
                rs = first[i][0]
                start = rs[-1].processed_chars if rs else 0
                resumed_on = []
                for _ in range(100):  # UNAVAILABLE/ABORTED while the dead connection is noticed: retry
                    again, broke = await stream_until_broken(
                        target, ids[i], bodies[i], 10, start=start, resume=bool(rs), options=FRESH,
                        on_channel=lambda info, seen=resumed_on: seen.append(info.worker_pid))
                    if not broke:
                        break
                    await asyncio.sleep(0.05)
                assert not broke and victim[0] not in resumed_on
                out[i] = again
            return out

        resumed = asyncio.run(resume_all())
        for i, body in enumerate(bodies):
            got = first[i][0] + resumed.get(i, [])
            assert fold(got) == unary(target, body), f"stream {ids[i]} differs from an uninterrupted run"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 143, err[-2000:]  # as every hmlstm command ends on SIGTERM
    assert "restarting it" in err  # the supervisor replaced the killed worker


def two_adjacent_free_ports() -> int:
    """P such that P and P + 1 are both free on loopback now."""
    for _ in range(200):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two adjacent free ports")


def test_workers_with_the_memory_store_are_warned_and_each_serves_its_own_metrics_port(tiny_onnx):
    """README: with --workers, --state-store memory gets a warning at start-up (a stream resumed on another
    worker is not found), and worker i serves its metrics on --metrics-port + i: each port counts exactly
    the calls its own worker answered."""
    import re
    import urllib.request

    port = free_port()
    metrics = two_adjacent_free_ports()
    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", str(tiny_onnx.path), "--workers", "2",
                             "--port", str(port), "--metrics-port", str(metrics)], stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target)
        answered = {0: 0, 1: 0}
        deadline = time.monotonic() + 120
        while min(answered.values()) < 3:  # fresh connections until each worker has answered a few calls
            answered[worker_of(target)[0]] += 1
            assert time.monotonic() < deadline, answered
        for i in (0, 1):
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics + i}/metrics", timeout=10).read().decode()
            count = re.search(r'^hmlstm_requests_total\{method="DescribeModel"\} (\S+)$', body, re.M)
            assert count and float(count.group(1)) == answered[i], (i, answered, count)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "--state-store memory with --workers 2: each worker holds only its own streams" in err, err


def test_sigterm_during_start_up_stops_every_worker_already_started(tiny_onnx):
    """Issue 30, item 7: SIGTERM while `--workers` is still starting its workers ends the supervisor and every
    worker it had started, promptly and without tracebacks."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "hmlstm.cli", "serve", str(tiny_onnx.path), "--workers", "4",
                             "--port", str(free_port()), "--metrics-port", "-1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:  # the first worker spawned
            time.sleep(0.02)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive
    assert "Traceback" not in err, err
