# The two commands the README starts with: `make demo` and `make test`.
# Both create .venv and install the package on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test lint install clean protos redis node

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/pip install --quiet -e '.[train,dev]'  # setuptools' notes on editable installs
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hmlstm demo

test: $(STAMP) redis node
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

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
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Regenerate the gRPC stubs; tests/serving/test_protos.py fails if they drift.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/hmlstm/v1/segmenter.proto
