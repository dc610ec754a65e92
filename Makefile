# Two commands do all set-up on a fresh machine:
#   make figures   regenerate the paper figures / results (the main job)
#   make test      lint + test suite
# Both create or reuse the project-local virtualenv .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,llm,deepspeed,ray
OUT    ?= results

# Many small numpy/scipy fits: threaded BLAS oversubscribes small machines (measured 80x slower under load).
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: figures test lint bench clean-venv quickstart

# torch: an installed torch (e.g. a GPU user's CUDA build) is never replaced; otherwise the version in
# constraints.txt is installed, from $(TORCH_INDEX) when set (README "Installing torch").
$(STAMP): pyproject.toml constraints.txt Makefile tools/ensure_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) tools/ensure_torch.py $(VENV)/torch-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

figures: $(STAMP)
	$(PY) -m paper_figures --out $(OUT)

# the RTO pipeline end to end on a token task with an exact gold reward (examples/quickstart, a few minutes on CPU)
quickstart: $(STAMP)
	$(PY) -m rto_llm.quickstart --out runs/quickstart

test: $(STAMP)
	$(VENV)/bin/ruff check .
	RTO_REQUIRE_OPTIONAL=1 $(VENV)/bin/pytest -q    # optional backends (ray) must run, not skip

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
