# clipdr: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed-stamp
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup tools demo test lint format lock clean gpu-check

setup: $(STAMP)

# The venv is (re)installed when the dependency pins change; torch comes from the exact pins in constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	# clip_benchmark, the reference of tests/unit/test_eval_parity.py, without its dependencies: it declares
	# transformers, which open_clip would then import in every process (see [hf] in pyproject.toml). Its metric
	# modules need only torch, tqdm and scikit-learn (in [dev]).
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-deps clip-benchmark
	touch $(STAMP)

# checkov (the infra scanner) pins boto3 and others apart from the project's stack: it gets its own venv.
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): infra/checkov-constraints.txt
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet -c infra/checkov-constraints.txt checkov
	touch $(TOOLS_STAMP)

demo: setup
	$(BIN)/clipdr demo --config jobs/configs/demo.toml

test: setup tools
	$(BIN)/python -m pytest

# On a machine with one CUDA device, unattended, <= 8 minutes (docs/reinforce.md#the-gpu-check). No setup: the
# script takes .venv if there is one, else the python3 on the PATH (the project's Docker image).
gpu-check:
	jobs/gpu_check.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: setup
	{ echo '# The exact stack clipdr is tested with (pip freeze of a fresh `make` venv). Regenerate with `make lock`.'; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v '^clipdr'; } > constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
