# Two commands matter: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU wheel unless an NVIDIA driver is present (then the CUDA build of TensorFlow).
TF_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(TF_EXTRA)

.PHONY: venv demo test test-fast bench browser notebooks-sync clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(TF_EXTRA),test,kaggle]"
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name python3 >/dev/null
	@touch $@

demo: venv
	$(BIN)/cmc-kit demo --out runs/demo

# Headless Chromium for the explorer-page test (Debian package; skipped cleanly elsewhere).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium install failed: browser tests will skip"; \
	  else echo "chromium not found: browser tests will skip (install Debian's chromium to run them)"; fi; }

# Two processes, a test file each at a time (--dist loadfile keeps a file's shared fixtures in
# one process): on 2 cores most tests wait on TensorFlow's tracing, one core each.
test: venv browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	@for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

notebooks-sync: venv
	$(BIN)/jupytext --sync notebooks/*.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
