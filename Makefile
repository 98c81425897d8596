# Two entry points, each bootstrapping .venv on first use:  make demo  |  make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.9,<2.15" "torchvision>=0.24,<0.30"
	$(PY) -m pip install -q -e ".[dev]"
	@bash scripts/ensure-browser.sh || echo "note: no headless browser; browser tests will be skipped"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedxray demo

# pytest's exit 5 means no tests were collected: make fails on it like on any other non-zero exit.
# The files run on TEST_WORKERS parallel workers (pytest-xdist; one file per worker at a time, so module
# fixtures are built once). 2 workers measured fastest on 2 cores (10-11 min; serial 19, 3 workers 15): the
# federation tests are CPU-bound, so more workers only slow each other down.
TEST_WORKERS ?= 2
test: $(STAMP)
	@$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$rc

# every hot path against its limit: one table, JSON under benchmarks/results/ (about 10 minutes on 2 cores)
bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf runs .pytest_cache
