# One-command set-up: every target creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo test test-slow bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The whole platform on three synthetic samples (feed, concentrate, tailings): Prefect server, Dask cluster,
# deployments and inbox watcher in ./ps3d-demo, a per-sample SQL summary, clean shutdown; 4-5 min on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/ps3d demo --workdir ps3d-demo

# Headless Chromium and its driver from the OS packages, for the dashboard's browser test (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -m "not slow" -q

# The long tests (the demo, the default model on real-size particles, the soak, the slowest fault tests); CI runs
# them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

bench: $(STAMP)
	$(BIN)/python bench/convert_memory.py

clean:
	rm -rf $(VENV) ps3d-data ps3d-output ps3d-demo .pytest_cache
