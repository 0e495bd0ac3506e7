"""tf.distribute: two local CPU workers on loopback agree with one worker on the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hmlstm.model.checkpoint import load_network

ARGS = ["train", "synthetic", "--steps", "4", "--batch-size", "8", "--seq-len", "10", "--layers", "2",
        "--units", "12", "--embed-dim", "8", "--output-dim", "16", "--checkpoint-every", "4", "--no-progress"]


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "hmlstm.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def weights(path):
    net, _ = load_network(path)
    return [v.numpy() for v in net.trainable_variables]


@pytest.mark.slow
def test_two_multiworker_workers_agree_with_one_worker(tmp_path):
    from hmlstm.cli import main

    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    workers = []
    scratch = tmp_path / "worker1-tmp"
    scratch.mkdir()
    for i in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
        if i == 1:
            env["TMPDIR"] = str(scratch)  # where the non-chief's scratch run directory goes (tempfile)
        # The non-chief is given an --out of its own: it must never write there (the chief writes the run).
        out = tmp_path / ("multi" if i == 0 else "multi-worker1")
        workers.append(run([*ARGS, "--strategy", "multiworker", "--out", str(out)], env=env))
    try:
        assert main([*ARGS, "--out", str(tmp_path / "single")]) == 0  # in this process, while the workers start
        for w in workers:
            assert w.wait(timeout=300) == 0, w.stderr.read()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert "training on 2 replica(s)" in workers[0].stderr.read()
    for a, b in zip(weights(tmp_path / "single"), weights(tmp_path / "multi")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not (tmp_path / "multi-worker1").exists()  # the non-chief wrote nothing to its --out...
    assert not any(p.name.startswith("hmlstm-worker-") for p in scratch.iterdir())  # ...and removed its scratch


def test_multiworker_without_tf_config_is_a_clear_error(capsys):
    from hmlstm.cli import main
    env_backup = os.environ.pop("TF_CONFIG", None)
    try:
        assert main(["train", "synthetic", "--strategy", "multiworker", "--steps", "1"]) == 2
    finally:
        if env_backup is not None:
            os.environ["TF_CONFIG"] = env_backup
    assert "TF_CONFIG" in capsys.readouterr().err


def test_batch_must_split_evenly_over_replicas(tmp_path):
    script = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from hmlstm.cli import main\n"
        "import sys; sys.exit(main(['train', 'synthetic', '--strategy', 'mirrored', '--batch-size', '7',"
        " '--steps', '1', '--out', sys.argv[1]]))\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "multiple of the 2 replicas" in r.stderr
