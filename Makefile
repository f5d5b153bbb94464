# The two set-up commands of the README, each on a local virtualenv:
#   make demo   install + train teacher, student (CE), student (KD) on the
#               embedded synthetic ECGs and print the metrics table
#   make test   install with [dev] extras + run the default test suite
# `make test-slow` runs the checks behind the `slow` marker; `make test-avx2`
# runs the default suite as a CPU without AVX-512 would (XLA:CPU's
# --xla_cpu_max_isa; onnxruntime has no runtime switch, its int8 export
# uses 7-bit weights so that its integer path is the same on every x86 CPU).
VENV ?= .venv
PY := $(VENV)/bin/python
# make demo VARIANTS=model=xresnet1d: config variants for every demo run.
VARIANTS ?=
PYTEST_ARGS ?=
# pytest-xdist workers, a test file each (module fixtures stay on one
# worker; files in the order tests/conftest.py sets, longest first);
# WORKERS=0 runs in this process.
WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder
# The default suite compiles hundreds of small programs and runs each a few
# times: compiling dominates, so XLA's optimisation passes are off for it
# (jax's jax_disable_most_optimizations: 1398 -> 986 s of test time, 12:02
# -> 8:35 of wall time on 2 cores; the properties tested do not depend on
# them). JAX_DISABLE_MOST_OPTIMIZATIONS=0 make test compiles as training
# does; `make test-slow` (AOT memory and compile checks) always does.
JAX_DISABLE_MOST_OPTIMIZATIONS ?= 1

.PHONY: demo test test-slow test-avx2 clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	PYTHON=$(PY) VARIANTS="$(VARIANTS)" launch/demo.sh $(WORKDIR)

test: $(VENV)/.installed-dev
	JAX_DISABLE_MOST_OPTIMIZATIONS=$(JAX_DISABLE_MOST_OPTIMIZATIONS) \
	  $(PYTEST) $(PYTEST_ARGS)

test-avx2: $(VENV)/.installed-dev
	JAX_DISABLE_MOST_OPTIMIZATIONS=$(JAX_DISABLE_MOST_OPTIMIZATIONS) \
	  XLA_FLAGS="$(XLA_FLAGS) --xla_cpu_max_isa=AVX2" $(PYTEST) $(PYTEST_ARGS)

# The slow checks include the TPU ahead-of-time compile ([tpu] adds libtpu)
# and a PyTorch teacher exported with torch.onnx ([torch-reference]).
$(VENV)/.installed-tpu: setup.py | $(PY)
	$(PY) -m pip install -q -e '.[dev,tpu,torch-reference]'
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed

test-slow: $(VENV)/.installed-tpu
	JAX_DISABLE_MOST_OPTIMIZATIONS=0 $(PYTEST) -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) workdir
