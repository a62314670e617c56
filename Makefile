# One-command set-up on a fresh machine with Python 3.11 and make.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# one torch thread: these small models run fastest that way on 2 cores, and never oversubscribe a busy machine
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m molkern.demo

# glibc returning freed memory to the OS makes fresh large tensors ~5x slower: keep it for benchmark runs
bench: $(STAMP)
	MALLOC_MMAP_THRESHOLD_=1000000000000 MALLOC_TRIM_THRESHOLD_=1000000000000 $(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(VENV) .pytest_cache
