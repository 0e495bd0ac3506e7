"""The server writes nowhere but where the manifests mount a volume (issue 22, item 5).

The pod's root filesystem is read-only with an emptyDir on /tmp (deploy/helm). Here: a mount namespace in
which HOME, the working directory and the whole checkout (code, virtualenv, shipped model) are read-only
bind mounts; the only writable places are /tmp and the SQLite store's directory, named explicitly.
"""

import os
import shutil
import subprocess
import sys

from hmlstm.serving.client import SegmenterClient
from hmlstm.serving.store import SQLiteStore
from tests.conftest import missing
from tests.serving.durable import free_port, wait_serving

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_server_runs_with_home_cwd_and_code_read_only(tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        missing("read-only bind mounts need unshare and root (a mount namespace of the test's own)")
    home = os.path.expanduser("~")
    cwd, store_dir = tmp_path / "cwd", tmp_path / "state"
    cwd.mkdir()
    store_dir.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro {cwd} {cwd}"], capture_output=True)
    if probe.returncode != 0:
        missing(f"this machine refuses a mount namespace: {probe.stderr.decode().strip()}")
    port = free_port()
    ro = [home, str(cwd), ROOT]
    mounts = " && ".join(f"mount --bind -o ro '{d}' '{d}'" for d in ro)
    checks = " && ".join(f"! touch '{d}/.hmlstm-write-probe' 2>/dev/null" for d in ro)
    serve = [sys.executable, "-m", "hmlstm.cli", "serve", "--port", str(port), "--metrics-port", str(free_port()),
             "--state-store", f"sqlite:{store_dir}/state.db"]
    script = f"{mounts} && {checks} && cd '{cwd}' && exec {' '.join(serve)}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # let it try to write .pyc
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", script], env=env, cwd=cwd, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_serving(f"127.0.0.1:{port}")
        with SegmenterClient(f"127.0.0.1:{port}") as c:
            rs = list(c.stream(["Read-only ", "roots."], stream_id="ro"))
            assert [r.durable for r in rs] == [True, True, False] and rs[-1].processed_chars == 16
            assert c.segment("Read-only roots.").segments
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err  # SIGTERM, as every hmlstm command
    assert "Read-only file system" not in err and "Permission denied" not in err, err
    for d in ro:
        assert not os.path.exists(os.path.join(d, ".hmlstm-write-probe"))
    assert SQLiteStore(store_dir / "state.db").load("ro") is None  # finished, so deleted: the store was written
    assert {p.name for p in store_dir.iterdir()} >= {"state.db"}
