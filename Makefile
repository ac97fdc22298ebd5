VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export TF_ENABLE_ONEDNN_OPTS := 0
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup test demo bench clean

# JAX_EXTRA=tpu or cuda12 adds the accelerator runtime for the installed jax version
# (`make setup JAX_EXTRA=tpu` on a Cloud TPU VM, `JAX_EXTRA=cuda12` on NVIDIA GPUs)
JAX_EXTRA ?=

# the runtime: what `make demo`, the launchers and every SLURM job or TPU worker use
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(if $(JAX_EXTRA),$(PY) -m pip install --quiet \
		"jax[$(JAX_EXTRA)]==$$($(PY) -c 'import jax; print(jax.__version__)')")
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# the test extras on top: pytest, scikit-learn and the PyTorch reference models (torch,
# torchvision, timm, transformers), which nothing outside tests/ and benchmarks/ imports
$(VENV)/.installed-test: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder -q --durations=20 tests

demo: setup
	$(PY) -m her2jax.demo --out demo_out

# her2jax vs PyTorch training-step throughput on this CPU (override with BENCH_ARGS=...; a chart
# in bench_out/compare.png), the CPU rewrites against XLA's library forms, then the input
# pipeline against the train step on a small synthetic dataset at 224 px
BENCH_ARGS ?= --models resnet18_dual,vit_small16,resnet50_dual,vit_base16 --image_size 224 --batch 8 --steps 5 \
	--warmup 2 --repeats 3 --dtype float32 --device cpu
bench: $(VENV)/.installed-test
	$(PY) benchmarks/torch_compare.py $(BENCH_ARGS) --json bench_out/compare.json
	$(PY) benchmarks/report_compare.py bench_out/compare.json --plot bench_out/compare.png \
		> bench_out/compare.md && echo "chart: bench_out/compare.png"
	$(PY) benchmarks/cpu_ops.py
	$(PY) -m data_prep.synthetic --out bench_out/cohort --patients 40 --size 64 > /dev/null
	$(PY) -m data_prep.prepare --source bench_out/cohort --data_dir bench_out/prepared \
		--image_size 224 --quiet > bench_out/dataset.txt
	$(PY) benchmarks/train.py --data_dir $$(tail -1 bench_out/dataset.txt) --batch 8 --steps 5 \
		--repeats 3

clean:
	rm -rf $(VENV) demo_out bench_out
