# A fresh clone needs two commands: `make serve` and `make test`. Everything else is built on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model_repo
GRPC_PORT ?= 50051
METRICS_PORT ?= 9100
# Set PARITY=0 to skip installing torch + transformers (the HF parity test then skips, saying why).
PARITY ?= 1
# Set PADDLE=0 to skip installing PaddlePaddle (the check against Paddle's own forward then skips, saying why).
PADDLE ?= 1

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
PARITY_STAMP := $(VENV)/.parity-installed
PADDLE_STAMP := $(VENV)/.paddle-installed
PROTOS := proto/scoring/v1/scoring.proto proto/scoring/v1/admin.proto
STUBS := scoring/v1/scoring_pb2.py scoring/v1/scoring_pb2_grpc.py scoring/v1/admin_pb2.py scoring/v1/admin_pb2_grpc.py
DEMO_MANIFEST := $(MODEL_REPO)/demo/1/manifest.json
TYPED_DIRS := $(wildcard model_format server scoring_client tools loadtest bench tests dashboards)

.PHONY: serve test lint typecheck bench soak stubs demo venv clean prometheus-installed

venv: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

$(PARITY_STAMP): requirements-parity.txt $(RUNTIME_STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-parity.txt \
	  || echo "warning: torch/transformers not installed; tests/test_parity_hf.py will skip"
	touch $@

$(PADDLE_STAMP): requirements-paddle.txt $(RUNTIME_STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-paddle.txt \
	  || echo "warning: PaddlePaddle not installed; its test in tests/test_paddle_import.py will skip"
	touch $@

# Debian's prometheus package (prometheus + promtool) for the observability tests.
prometheus-installed:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# Python stubs are generated from the proto, never edited by hand (and never committed).
stubs: $(STUBS)
$(STUBS) &: $(PROTOS) $(RUNTIME_STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch scoring/__init__.py scoring/v1/__init__.py

# The demo model is built, not committed: seeded, so every build is the same model.
demo: $(DEMO_MANIFEST)
$(DEMO_MANIFEST): | $(RUNTIME_STAMP)
	$(BIN)/python -m tools.build_model --demo --out $(MODEL_REPO) --precision int8 --if-absent

serve: $(STUBS) demo
	$(BIN)/python -m server --model-repo $(MODEL_REPO) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

lint: $(DEV_STAMP) $(STUBS)
	$(BIN)/ruff check .

typecheck: $(DEV_STAMP) $(STUBS)
	$(BIN)/mypy $(TYPED_DIRS)

test: $(DEV_STAMP) $(STUBS) $(if $(filter 1,$(PARITY)),$(PARITY_STAMP)) $(if $(filter 1,$(PADDLE)),$(PADDLE_STAMP)) \
      prometheus-installed
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED_DIRS)
	SCORING_REQUIRE_PROMETHEUS=1 $(BIN)/pytest -q

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): requirements-bench.txt $(RUNTIME_STAMP)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements-bench.txt
	touch $@

# MLServer has an environment of its own (requirements-mlserver.txt says why): requirements.txt's pins but uvloop,
# plus MLServer. Not fatal: bench.compare leaves MLServer out, saying so, when it is missing.
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
$(MLSERVER_STAMP): requirements.txt requirements-mlserver.txt
	test -x $(MLSERVER_VENV)/bin/python || $(PYTHON) -m venv $(MLSERVER_VENV)
	grep -v '^uvloop==' requirements.txt > $(MLSERVER_VENV)/runtime-requirements.txt
	$(MLSERVER_VENV)/bin/pip install --disable-pip-version-check -q -r $(MLSERVER_VENV)/runtime-requirements.txt \
	  -r requirements-mlserver.txt && touch $@ || echo "warning: MLServer not installed; bench.compare leaves it out"

bench: $(DEV_STAMP) $(BENCH_STAMP) $(MLSERVER_STAMP) $(STUBS) demo
	$(BIN)/python -m bench --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.compare --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.overload --model-repo $(MODEL_REPO) --out bench_out
	-$(BIN)/python -m bench.swaps --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.cache_zipf --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.workers_scale --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.percall --model-repo $(MODEL_REPO) --out bench_out
	$(BIN)/python -m bench.paths --model-repo $(MODEL_REPO) --out bench_out

# 30 minutes at 70% of the sustainable rate with a hot swap every 5 minutes (not part of `make bench`).
soak: $(DEV_STAMP) $(STUBS) demo
	$(BIN)/python -m bench.soak --model-repo $(MODEL_REPO) --out bench_out --minutes 30

clean:
	rm -rf scoring $(VENV) $(MLSERVER_VENV) .mypy_cache .ruff_cache .pytest_cache bench_out
