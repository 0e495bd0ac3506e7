"""Container and cluster files: what can be checked without a container engine.

No Docker engine runs here, so the images are not built. What is checked: the
manifests parse and agree on ports, probes, image and state store; the
Dockerfiles run as a non-root user with a health check on the gRPC health
service; and the images' install and start commands work in a fresh virtualenv.
"""

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRPC, METRICS = 50051, 9464


def docs(path):
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def by_kind(items, kind, name=None):
    return next(d for d in items if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def test_kubernetes_manifests_agree_on_ports_probes_image_and_store():
    app, redis = docs("deploy/k8s/hmlstm.yaml"), docs("deploy/k8s/redis.yaml")
    dep = by_kind(app, "Deployment", "hmlstm")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC, "metrics": METRICS}
    args = c["args"]
    assert args[args.index("--port") + 1] == str(GRPC) and args[args.index("--metrics-port") + 1] == str(METRICS)
    assert c["readinessProbe"]["grpc"]["port"] == GRPC and c["livenessProbe"]["grpc"]["port"] == GRPC
    assert c["image"].endswith(":gpu") and c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    grace = float(args[args.index("--grace") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    svc = by_kind(app, "Service", "hmlstm")
    assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
    hpa = by_kind(app, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "hmlstm"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "hmlstm_active_streams"
    store = args[args.index("--state-store") + 1]
    m = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", store)
    rsvc = by_kind(redis, "Service")
    assert m and m.group(1) == rsvc["metadata"]["name"] and int(m.group(2)) == rsvc["spec"]["ports"][0]["port"]
    env = {e["name"] for e in c["env"]}
    assert args[args.index("--auth-token-env") + 1] in env


def test_compose_file():
    (svc,) = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())["services"].values()
    assert {f"{GRPC}:{GRPC}", f"{METRICS}:{METRICS}"} == set(svc["ports"])
    assert svc["healthcheck"]["test"][1:3] == ["hmlstm", "health"]
    store = svc["command"][svc["command"].index("--state-store") + 1]
    assert store.startswith("sqlite:/data/") and any(v.endswith(":/data") for v in svc["volumes"])


@pytest.mark.parametrize("name, base", [("Dockerfile", "python:3.11-slim"),
                                        ("Dockerfile.gpu", "nvidia/cuda:13.0.0-cudnn-runtime")])
def test_dockerfiles(name, base):
    text = (ROOT / name).read_text()
    assert re.search(rf"^FROM {re.escape(base)}", text, re.M)
    assert re.search(r"^USER hmlstm$", text, re.M) and "useradd" in text
    assert re.search(rf"^EXPOSE {GRPC} {METRICS}$", text, re.M)
    assert '"hmlstm", "health"' in text and "HEALTHCHECK" in text
    assert "chown hmlstm /data" in text


def _run_commands(name: str) -> list[str]:
    """The shell commands of a Dockerfile's RUN lines that install the package."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    cmds = [c.strip() for r in runs for c in r.split("&&")]
    return [c for c in cmds if c.startswith("pip ")]


@pytest.mark.slow
def test_image_install_and_start_commands_work_in_a_fresh_virtualenv(tmp_path):
    """Dockerfile's pip commands in a new venv, then its ENTRYPOINT: the server answers health."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PATH=f"{venv}/bin:{os.environ['PATH']}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    for cmd in _run_commands("Dockerfile"):
        subprocess.run(shlex.split(cmd.replace("pip ", f"{venv}/bin/pip ", 1)) + ["-q"], check=True, cwd=ROOT,
                       env=env, timeout=600)
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is None)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.strip() == "True", "the server image must not carry TensorFlow"
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(venv / "bin" / "hmlstm"), "serve", "--port", str(port), "--metrics-port", "-1",
                               "--device", "cpu"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([str(venv / "bin" / "hmlstm"), "health", "--target", f"127.0.0.1:{port}"],
                               env=env, cwd=tmp_path, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert time.monotonic() < deadline, r.stderr
            time.sleep(0.5)
        assert "SERVING" in r.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_building_the_package_prints_no_deprecation_warning(tmp_path):
    """`make demo` and `make test` install the package first: setuptools once warned there, twice, that the
    license as a TOML table is deprecated (now an SPDX string)."""
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".",
                        "-w", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "deprecat" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    # ...and the Makefile's editable install, run as the Makefile runs it in a new venv (pip upgraded first,
    # as it does: a newer pip's build environment brings a newer setuptools with more to say)
    make = (ROOT / "Makefile").read_text()
    env_prefix, _ = re.search(r"\t(\S+=\S+ )?\$\(BIN\)/pip install --quiet -e (\S+)", make).groups()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--upgrade", "pip"], capture_output=True,
                   timeout=300)
    env = dict(os.environ, **dict([env_prefix.strip().split("=", 1)])) if env_prefix else dict(os.environ)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "-e", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    noise = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    assert r.returncode == 0 and not noise, noise  # (the Location lines are this machine's pip configuration)
