# The two commands: `make demo` and `make test`. Each sets everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hvpmtl-installed

.PHONY: setup demo demo-clean test test-fast test-local bench bench-gpu clean
setup: $(STAMP)
$(STAMP): requirements.txt setup.py tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)

demo: setup
	VENV=$(VENV) bash launchers/demo.sh $(ARGS)

# Start the demo anew (a finished demo is not run again); keeps demo_data/ and the MLflow history.
demo-clean:
	rm -rf runs/demo

test: setup
	bash tools/install_system_deps.sh
	$(PY) -m pytest tests

# No process launches (no `slow`, no `cluster` test): under 3 minutes on 2 cores.
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
