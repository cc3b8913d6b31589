# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-slow bench serve clean-state

# pip, not uv: only pip sees the torch wheels already on these machines (see README).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: synthetic data, the committed demo model and codecs,
# local Prefect server, LocalCluster, local zarr store. Every stage is cached: a rerun
# recomputes nothing, and an interrupted run resumes where it stopped.
demo: $(STAMP)
	$(BIN)/mfiba run --preset demo
	@echo ""
	@echo "Report: runs/demo/report.md (with bdrate.csv, rd_points.csv, bits_per_scale.csv, timing.csv, provenance.json, plots/)"
	@echo "Fit report: runs/demo/fit/<version>/report.md. Every method: mfiba run --preset demo-full. Codecs: mfiba codec-report"
	@echo "Prefect UI: run 'PREFECT_HOME=.state/prefect $(BIN)/prefect server start --host 127.0.0.1' and open http://127.0.0.1:4200"

test: $(STAMP)
	$(BIN)/pytest -q

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

# The local Prefect server (127.0.0.1), the mfiba-local work pool with one worker, every
# deployment registered; Ctrl-C stops all of it. Then: .venv/bin/mfiba trigger pipeline/demo
serve: $(STAMP)
	$(BIN)/mfiba serve

# Measured figures (not tests): runs/bench/bench.json and bench.md. benchmarks.prepare builds
# what they read once: the demo feature store (with the train split), the demo's fit (the
# allocation section) and, for the paper's codec, demo-elic's ELIC retrained on the train
# split's features on bench-elic's short schedule, alone (--only: the other families keep
# their committed checkpoints), beside the precoding and the fit.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.prepare
	$(BIN)/python -m benchmarks.bench

clean-state:
	rm -rf .state
