# From a fresh machine: `make install` (.venv with jdit), `make demo`; `make test` also installs the test extras
# (pytest and the PyTorch references) and runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.jdit-installed
BASE   := $(VENV)/.jdit-base-installed
# Tests simulate an 8-device mesh on the CPU. Two pytest-xdist workers: much of a small test is single-threaded
# compilation, so two run in ~80% of the time of one on a 2-core machine. --dist loadgroup keeps a module marked
# xdist_group on one worker, so its expensive module fixture (a trained run) is built once. Each worker's XLA runs
# its ops on one thread (two workers share two cores): 5% faster than both pools contending (195.6 s -> 185.1 s on
# train, dit and family tests, AMD EPYC); subprocesses set their own XLA_FLAGS.
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false \
	intra_op_parallelism_threads=1" JAX_PLATFORMS=cpu
TEST_WORKERS ?= 2

.PHONY: test demo demo-lora demo-t2i install install-test table clean

WORKDIR ?= workdir/digits

# jdit and what it needs to train, sample and evaluate (`make install`; ~2.6 GB with TensorFlow for TensorBoard).
$(BASE): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(BASE)

# The test extras on top: pytest, and the PyTorch reference implementations (torch CPU, diffusers, transformers,
# guided-diffusion) the parity tests and the weight importers use.
$(STAMP): $(BASE)
	$(PY) -m pip install -q -e ".[test,torch]"
	# The real CLIP BPE vocabulary for the tokenizer tests (a data file; open_clip itself is never imported).
	$(PY) -m pip install -q --no-deps "open_clip_torch==3.3.0"
	# torch-fidelity: the Inception-v3 reference of the evaluation tests (its package __init__ is never run).
	$(PY) -m pip install -q --no-deps "torch-fidelity==0.4.0"
	touch $(STAMP)

install: $(BASE)

install-test: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=10 $(PYTEST_ARGS)

# The main job on the embedded default: train the digits DiT (~4k steps, a few minutes on 2 CPU cores), then
# sample a class-conditional grid and score it with a classifier trained on the real digits.
demo: $(BASE)
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=configs/digits.py --workdir=$(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=configs/digits.py --workdir=$(WORKDIR) --mode=sample
	$(PY) tools/eval_digits.py --samples=$(WORKDIR)/samples.npz

# LoRA on the digits: rank-4 adapters on the frozen demo model learn the digits upside down (~2 minutes on 2 CPU
# cores; runs `make demo` first when its workdir has no checkpoint), then the samples, turned back, are scored.
LORA_WORKDIR ?= workdir/digits_lora
demo-lora: $(BASE)
	test -d $(WORKDIR)/checkpoints || $(MAKE) demo
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=configs/digits_lora.py --workdir=$(LORA_WORKDIR) \
		--config.init_from=$(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=configs/digits_lora.py --workdir=$(LORA_WORKDIR) --mode=sample \
		--config.init_from=$(WORKDIR)
	$(PY) tools/eval_digits.py --samples=$(LORA_WORKDIR)/samples.npz --rotate=180

# The text-to-image demo: an MM-DiT and its own text encoder on digit scenes (~8 minutes on 2 CPU cores), then
# the held-out prompts (digit pairs never trained on), scored for both digits and both colors.
T2I_WORKDIR ?= workdir/digit_scenes
# make demo-t2i T2I_CONFIG=configs/digit_scenes.py:flux: the same demo with a tiny Flux
T2I_CONFIG ?= configs/digit_scenes.py
demo-t2i: $(BASE)
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=$(T2I_CONFIG) --workdir=$(T2I_WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m jdit.main --config=$(T2I_CONFIG) --workdir=$(T2I_WORKDIR) --mode=sample
	$(PY) tools/eval_digit_scenes.py --samples=$(T2I_WORKDIR)/samples.npz

table: $(BASE)
	JAX_PLATFORMS=cpu $(PY) tools/model_table.py

clean:
	rm -rf $(VENV) .pytest_cache
