# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-slow bench clean-state

# pip, not uv: only pip sees the torch wheels already on these machines (see README).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: synthetic data, the committed demo model, local
# Prefect server, LocalCluster, local zarr store, the committed demo codecs. (Precoding,
# fitting and evaluation stages join this target as they land.)
demo: $(STAMP)
	$(BIN)/mfiba features --preset demo
	$(BIN)/mfiba codec-report --preset demo
	@echo ""
	@echo "Feature store: runs/demo/features.zarr   stage manifests: runs/demo/manifests/"
	@echo "Codec report: runs/demo/codec-report/summary.csv (bitstreams under runs/demo/codec-report/streams/)"
	@echo "Prefect UI: run 'PREFECT_HOME=.state/prefect $(BIN)/prefect server start --host 127.0.0.1' and open http://127.0.0.1:4200"

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# Measured figures (not tests): runs/bench/bench.json and bench.md. Needs the demo feature store.
bench: $(STAMP)
	test -d runs/demo/features.zarr || $(BIN)/mfiba features --preset demo
	$(BIN)/python -m benchmarks.bench

clean-state:
	rm -rf .state
