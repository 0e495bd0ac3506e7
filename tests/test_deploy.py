"""Container and cluster files: what can be checked without a container engine.

No Docker engine runs here, so the images are not built. What is checked: the
manifests parse and agree on ports, probes, image and state store; the
Dockerfiles run as a non-root user with a health check on the gRPC health
service; and the images' install and start commands work in a fresh virtualenv.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import missing

ROOT = Path(__file__).resolve().parents[1]
GRPC, METRICS = 50051, 9464


CHART = ROOT / "deploy/helm/hmlstm"
OVERLAYS = ("cpu", "gpu")


def docs(path):
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def by_kind(items, kind, name=None):
    return next(d for d in items if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def tool(name: str) -> str:
    """A deployment checker from .tools/ (make test installs them at the versions in
    deploy/check-requirements.txt); missing: a skip, or a failure under CI."""
    exe = ROOT / ".tools" / "bin" / name
    if not exe.exists():
        missing(f"{name} is not installed in .tools/ (make test installs deploy/check-requirements.txt)")
    return str(exe)


IMAGE = "registry.example.com/hmlstm"  # the Makefile's IMAGE_PLACEHOLDER: the rendered files' image


def helm_template(overlay: str, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("helm"), "template", "hmlstm", str(CHART), "-n", "hmlstm", "--set",
                           "createNamespace=true", *[a for s in sets for a in ("--set", s)],
                           "-f", str(CHART / f"values-{overlay}.yaml")], capture_output=True, text=True, timeout=120)


def render(overlay: str) -> str:
    """`helm template` of the chart with one overlay, as `make manifests` writes deploy/k8s/OVERLAY.yaml."""
    r = helm_template(overlay, f"image.repository={IMAGE}")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_chart_refuses_to_render_without_the_image_you_pushed(overlay):
    """No image is published: an install that names none fails at render time, saying what to build and set,
    instead of pods that cannot pull ghcr.io/hmlstm/hmlstm."""
    r = helm_template(overlay)
    assert r.returncode != 0 and "image.repository is not set" in r.stderr and "Dockerfile.gpu" in r.stderr
    assert "ghcr.io" not in (CHART / "values.yaml").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gpu_overlay_reaches_tainted_gpu_nodes_rolls_without_a_spare_gpu_and_waits_for_the_load(overlay):
    items = list(yaml.safe_load_all(render(overlay)))
    dep = by_kind([i for i in items if i], "Deployment", "hmlstm")
    pod, (c,) = dep["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]["containers"]
    startup = c["startupProbe"]
    assert startup["grpc"]["port"] == GRPC and "initialDelaySeconds" not in c["livenessProbe"]
    if overlay == "gpu":
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a TensorRT engine build
        assert "nvidia.com/gpu.present" in str(pod["affinity"])
    else:
        assert "tolerations" not in pod and "strategy" not in dep["spec"] and "affinity" not in pod
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    # the values an operator may set land where Kubernetes reads them
    r = helm_template(overlay, f"image.repository={IMAGE}", "nodeSelector.pool=gpu-a100")
    assert r.returncode == 0 and "nodeSelector:\n        pool: gpu-a100" in r.stdout, r.stderr


def test_the_gpu_image_appends_to_the_base_images_library_path():
    """The base image's LD_LIBRARY_PATH holds where the NVIDIA runtime mounts the driver (libcuda.so.1)."""
    (line,) = [ln for ln in (ROOT / "Dockerfile.gpu").read_text().splitlines() if ln.startswith("ENV LD_LIBRARY_PATH")]
    assert line.startswith("ENV LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rendered_manifests_are_the_charts(overlay):
    committed = (ROOT / f"deploy/k8s/{overlay}.yaml").read_text()
    body = committed[committed.index("---"):]  # after the header comment
    assert body == render(overlay), f"deploy/k8s/{overlay}.yaml is stale: run make manifests"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_validate_for_kubernetes_1_37(overlay):
    r = subprocess.run([tool("kubernetes-validate"), "-k", "1.37.0", "--strict", "--quiet",
                        str(ROOT / f"deploy/k8s/{overlay}.yaml")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_checkov_finds_nothing_in_deploy_or_the_dockerfiles(tmp_path):
    """checkov on deploy/ (the rendered manifests, and the chart, which it renders with helm, given the image
    an operator must set) and on both Dockerfiles: 0 failed checks; every skip carries a written reason."""
    env = dict(os.environ, PATH=f"{ROOT / '.tools' / 'bin'}:{os.environ['PATH']}", BC_SKIP_MAPPING="TRUE",
               LOG_LEVEL="ERROR")
    reasons = skip_reasons()
    reports = []
    image = tmp_path / "image.yaml"  # checkov hands --var-file to `helm template --values`
    image.write_text(f"image: {{repository: {IMAGE}}}\n")
    for target in (["-d", "deploy", "--var-file", str(image), "--framework", "kubernetes", "helm"],
                   ["-f", "Dockerfile", "-f", "Dockerfile.gpu"]):
        r = subprocess.run([tool("checkov"), *target, "-o", "json", "--compact", "--skip-download"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        out = json.loads(r.stdout)
        reports += out if isinstance(out, list) else [out]
    frameworks = {rep["check_type"] for rep in reports}
    assert {"kubernetes", "helm", "dockerfile"} <= frameworks, frameworks
    for rep in reports:
        summary = rep["summary"]
        assert summary["failed"] == 0, [(c["check_id"], c["resource"]) for c in rep["results"]["failed_checks"]]
        assert summary["passed"] > 0
        assert {c["check_id"] for c in rep["results"].get("skipped_checks", [])} <= set(reasons), reasons
    # every skip is an annotation beside the object it exempts, with its reason written out
    assert reasons and all(len(why) > 40 for why in reasons.values()), reasons


def skip_reasons() -> dict[str, str]:
    """check id -> reason, from the checkov.io/skip annotations of the rendered manifests."""
    out = {}
    for overlay in OVERLAYS:
        for d in docs(f"deploy/k8s/{overlay}.yaml"):
            for key, value in (d["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, why = value.partition("=")
                    out[check] = why
    return out


def test_hadolint_has_no_warning():
    r = subprocess.run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile", "Dockerfile.gpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def serve_args(container) -> list[str]:
    return list(container["args"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_manifests_agree_on_ports_probes_store_token_and_security(overlay):
    items = docs(f"deploy/k8s/{overlay}.yaml")
    ns = by_kind(items, "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"].get("namespace") == ns["metadata"]["name"] for d in items if d["kind"] != "Namespace")
    dep = by_kind(items, "Deployment", "hmlstm")
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC, "metrics": METRICS}
    # the container's arguments are ones the real command line accepts, with the ports above
    from hmlstm.cli import build_parser

    args = build_parser().parse_args(["serve", *serve_args(c)])
    assert (args.port, args.metrics_port) == (GRPC, METRICS)
    assert c["readinessProbe"]["grpc"]["port"] == GRPC and c["livenessProbe"]["grpc"]["port"] == GRPC
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace
    assert args.max_connection_age and args.max_connection_age_grace + args.grace <= \
        pod["spec"]["terminationGracePeriodSeconds"] + args.max_connection_age
    # GPU overlay: one GPU and --device cuda; CPU overlay: no GPU
    limits = c["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and args.device == "cuda" and c["image"].endswith(":gpu")
    else:
        assert "nvidia.com/gpu" not in limits and args.device == "cpu" and c["image"].endswith(":cpu")
    # restricted Pod Security, for both Deployments
    for d in (dep, by_kind(items, "Deployment", "hmlstm-redis")):
        spec = d["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] > 10000
        for ctr in spec["containers"]:
            sc = ctr["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert {"cpu", "memory"} <= set(ctr["resources"]["requests"]) & set(ctr["resources"]["limits"])
            assert "readinessProbe" in ctr and "livenessProbe" in ctr
    # the token is a file from the Secret, never an environment variable
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    secret = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert Path(args.auth_token_file).parent == Path(mounts[secret["name"]])
    assert not any("valueFrom" in e for e in c.get("env", []))
    # the Services: one virtual IP, and a headless one for clients that balance per call
    for name in ("hmlstm", "hmlstm-headless"):
        svc = by_kind(items, "Service", name)
        assert svc["spec"]["selector"] == pod["metadata"]["labels"]
    assert by_kind(items, "Service", "hmlstm-headless")["spec"]["clusterIP"] == "None"
    hpa = by_kind(items, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "hmlstm"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "hmlstm_active_streams"
    assert by_kind(items, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]
    # the store: the Redis Service, reachable from the hmlstm pods only
    m = re.fullmatch(r"redis://([\w-]+)\.([\w-]+)\.svc:(\d+)/\d+", args.state_store)
    rsvc = by_kind(items, "Service", "hmlstm-redis")
    assert m and m.group(1) == rsvc["metadata"]["name"] and m.group(2) == ns["metadata"]["name"]
    assert int(m.group(3)) == rsvc["spec"]["ports"][0]["port"]
    policy = by_kind(items, "NetworkPolicy", "hmlstm-redis")
    assert policy["spec"]["podSelector"]["matchLabels"] == by_kind(items, "Deployment", "hmlstm-redis")[
        "spec"]["selector"]["matchLabels"]
    assert [f["podSelector"]["matchLabels"] for f in policy["spec"]["ingress"][0]["from"]] == [
        pod["metadata"]["labels"]]
    # every emptyDir the server may write to is mounted; nothing else is writable (test_readonly_fs.py)
    assert mounts["tmp"] == "/tmp" and {"name": "HOME", "value": "/tmp"} in c["env"]


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
    assert re.search(r"^USER 10001:10001$", text, re.M) and "useradd --create-home --uid 10001 --gid 10001" in text
    assert re.search(rf"^EXPOSE {GRPC} {METRICS}$", text, re.M)
    assert '"hmlstm", "health"' in text and "HEALTHCHECK" in text
    assert "chown hmlstm /data" in text


def _run_commands(name: str) -> list[str]:
    """The shell commands of a Dockerfile's RUN lines that install the package (pip, and the scripts they read)."""
    text = (ROOT / name).read_text().replace("\\\n", " ")
    runs = [line[4:] for line in text.splitlines() if line.startswith("RUN ")]
    cmds = [c.strip() for r in runs for c in r.split("&&")]
    return [c for c in cmds if c.startswith(("pip ", "python scripts/", "rm /tmp/"))]


@pytest.mark.slow
def test_image_install_and_start_commands_work_in_a_fresh_virtualenv(tmp_path):
    """Dockerfile's pip commands in a new venv, then its ENTRYPOINT: the server answers health."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PATH=f"{venv}/bin:{os.environ['PATH']}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    commands = _run_commands("Dockerfile")
    assert [c.split()[0] for c in commands] == ["python", "pip", "pip", "rm"], commands
    for cmd in commands:
        cmd = cmd.replace("/tmp/", f"{tmp_path}/")
        if not cmd.startswith("rm "):
            cmd = f"{venv}/bin/{cmd}" + (" -q" if cmd.startswith("pip ") else "")
        r = subprocess.run(shlex.split(cmd), cwd=ROOT, env=env, timeout=600, capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    py = str(venv / "bin" / "python")
    probe = subprocess.run([py, "-c", "import importlib.util as u; print(u.find_spec('tensorflow') is None)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.strip() == "True", "the server image must not carry TensorFlow"
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True, env=env).stdout
    assert "onnxruntime==1.31" in freeze and "onnxruntime-gpu" not in freeze, freeze
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
