# Mobile VLA platform. Two commands on a fresh machine:
#   make demo   # the whole loop on embedded defaults (local Ray, SQLite MLflow, MiniWorld)
#   make test   # the test suite (sets itself up first)
#   make lint   # ruff: lint and format check (rules in pyproject.toml)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mobile-vla-installed
export MLFLOW_DISABLE_TELEMETRY := true
export PYOPENGL_PLATFORM := egl
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup lint format test test-fast test-shuffled demo demo-tiny bench quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml scripts/setup.sh requirements/dev.lock.txt
	VENV=$(VENV) bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# client/tests are the robot client's own (client/, a package of its own); its live tests run against the
# real app from tests/serve/test_client_package.py. Tests run in file order (-p no:randomly); test-shuffled
# runs them in a random order (pytest-randomly, its seed is printed at the top; repeat that order with:
# make test-shuffled PYTEST_ARGS="--randomly-seed=SEED").
# test-fast leaves out the tests marked `slow` (real training and fine-tunes, ONNX exports of new models, sweeps,
# Serve apps, Ray Train, MiniWorld rollouts over ~5 s, the demo); `make test` runs everything. Measured on 2 cores:
# test-fast 3 min 45 s on a quiet box (2026-12-06, 579 tests); make test 43 minutes on a partly loaded box
# (2026-12-07, 802 tests), 55-60 minutes from fresh clones later that day (1,035 tests).
test: setup
	$(PY) -m pytest tests client/tests -p no:randomly --durations=40 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests client/tests -p no:randomly -m "not slow" $(PYTEST_ARGS)

test-shuffled: setup
	$(PY) -m pytest tests client/tests $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/mobile-vla demo $(DEMO_ARGS)

demo-tiny: setup
	$(VENV)/bin/mobile-vla demo --preset tiny $(DEMO_ARGS)

# CPU benchmarks, one after another (each writes benchmarks/results/<name>.json). Run on a quiet box.
# benchmarks/gpu_check.py is for a GPU node only (see docs/gpu.md).
CPU_BENCHMARKS := data_generate data_pipeline policy_step inference train_overhead serve_load closed_loop
bench: setup
	for b in $(CPU_BENCHMARKS); do $(PY) benchmarks/$$b.py || exit 1; done

# The quality report: the whole budgeted recipe (benchmarks/quality.py: data, behaviour cloning on
# jobs/configs/small.yaml, DAgger rounds, closed loop on the held-out splits next to the expert),
# CPU per stage, in its own platform home (.mobile_vla/quality). Run on a quiet box; flags in QUALITY_ARGS.
quality: setup
	$(PY) benchmarks/quality.py $(QUALITY_ARGS)

clean:
	rm -rf .mobile_vla benchmarks/results .pytest_cache
