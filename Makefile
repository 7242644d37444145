# The two commands: `make demo` and `make test`. Each sets everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hvpmtl-installed

.PHONY: setup demo demo-clean test test-fast test-local bench bench-gpu clean constraints
setup: $(STAMP)
$(STAMP): requirements.txt constraints.txt setup.py tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)

demo: setup
	VENV=$(VENV) bash launchers/demo.sh $(ARGS)

# Start the demo anew (a finished demo is not run again); keeps demo_data/ and the MLflow history.
demo-clean:
	rm -rf runs/demo

test: setup
	bash tools/install_system_deps.sh
	$(PY) -m pytest tests --durations=40

# No process launches and no DeepSpeed engine trained (no `slow`, no `cluster` test): under 3 minutes on 2 cores.
test-fast: setup
	$(PY) -m pytest tests -m "not cluster and not slow"

# Everything but the cluster tests (no Debian packages needed).
test-local: setup
	$(PY) -m pytest tests -m "not cluster"

bench: setup
	$(PY) benchmarks/train_step.py --device auto
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/data_pipeline.py

# One GPU, under 8 minutes: ViT-B and Swin-B full steps under ZeRO-2 (img/s, MFU, memory), DALI alone and in
# the loop, the kernel checks -> bench_gpu/bench_gpu.{json,md}. A lent machine without the venv:
# benchmarks/gpu_bench.sh. Its --tiny twin runs on the CPU in tests/benchmarks/.
bench-gpu: setup
	$(PY) benchmarks/bench_gpu.py --out bench_gpu

clean:
	rm -rf runs demo_data mlruns mlflow.db .pytest_cache bench_gpu

# Refresh constraints.txt: a fresh venv with the newest versions requirements.txt admits, then its exact versions
# (docs/INSTALL.md). Run the tests on it before committing the new file.
constraints:
	rm -rf .venv-refresh && HVPMTL_NO_CONSTRAINTS=1 bash tools/setup_env.sh .venv-refresh
	{ sed -n '1,2p' constraints.txt; .venv-refresh/bin/python -m pip freeze --exclude-editable | grep -v '^hvpmtl'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-refresh
