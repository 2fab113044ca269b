# One command to set up and run the pipeline (`make run`), one to set up and test (`make test`).
# The environment is a local .venv pinned by requirements/lock.txt. torch is installed first and
# pinned (TORCH), from TORCH_INDEX when it is set, so nothing else chooses its build: e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu126   # a CUDA 12.6 build (docs/gpu.md)
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu     # the CPU-only build

PYTHON ?= python3
VENV ?= .venv
CORES ?= 2
CONFIG ?= config/config.yaml
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
UV ?= uv==0.13.10
PYTEST_ARGS ?=
TEST_WORKERS ?= 3

BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
# `python -m conv2dlstm` runs this checkout's package, as the workflow's jobs do
export PYTHONPATH := $(CURDIR)/src$(if $(PYTHONPATH),:$(PYTHONPATH))

MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
MLFLOW_AUTH_DB ?= sqlite:///$(CURDIR)/mlflow-auth.db
MLFLOW_AUTH_PERMISSION ?= NO_PERMISSIONS
MLFLOW_AUTH_ADMIN_PASSWORD_FILE ?=

.PHONY: setup run run-seed run-zoo run-zoo-seed sweep forecast summary check-upstream tables tables-check config test test-fast lint report mlflow-ui \
	mlflow-server bench bench-scale bench-keras clean

# torch comes first, alone, from pip (which knows a machine's local builds and pip.conf), from
# TORCH_INDEX when it is set and otherwise constrained by the lock. Everything else comes from the
# lock through uv (UV, pinned; parallel downloads and byte-compiling, about 3x faster than pip here),
# and through pip where uv cannot be installed or fails (no PyPI, a mirror only pip.conf knows).
# Both byte-compile what they install: where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this project is tested on), Python would otherwise compile torch and the rest in every process.
$(VENV)/.installed: pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)",-c requirements/lock.txt)
	{ $(BIN)/python -m pip install --quiet "$(UV)" && $(BIN)/uv pip install --quiet --link-mode copy --compile-bytecode --python $(BIN)/python -c requirements/lock.txt -e ".[workflow,test]"; } \
		|| { echo "uv could not install the locked packages; pip installs them"; $(BIN)/python -m pip install --quiet -c requirements/lock.txt -e ".[workflow,test]"; }
	touch $@

# The package's own modules are byte-compiled too (compileall redoes a file only when it changed): where
# PYTHONDONTWRITEBYTECODE is set, every job would otherwise compile the modules it imports from source.
setup: $(VENV)/.installed
	@$(BIN)/python -m compileall -q src

## run: the whole pipeline on the default (embedded, offline) data, then where the results are
run: setup
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG)
	@$(BIN)/python -m conv2dlstm summary --config $(CONFIG)

## run-seed: the fe, po4, si -> NO3 seed task with the notebook's Conv2D-LSTM
run-seed: CONFIG = config/seed_no3.yaml
run-seed: run

## run-zoo: every network on the default data under one protocol, scored to lead 10 (config/zoo.yaml)
run-zoo: CONFIG = config/zoo.yaml
run-zoo: run

## run-zoo-seed: every network on the seed task (config/zoo_seed_no3.yaml over config/seed_no3.yaml)
run-zoo-seed: CONFIG = config/seed_no3.yaml config/zoo_seed_no3.yaml
run-zoo-seed: run

## sweep: the 2 x 2 sweep of config/sweep.yaml (its own experiment and summary)
sweep: CONFIG = config/sweep.yaml
sweep: run

## summary: where CONFIG's results are, and its skill in three lines
summary: setup
	@$(BIN)/python -m conv2dlstm summary --config $(CONFIG)

## check-upstream: whether the files of CONFIG's url source changed on the server since they were fetched;
## when some did it writes resources/raw/<name>/upstream.json, and the next `make run` fetches them again
## (docs/data.md). CHECK_ARGS: e.g. --download
CHECK_ARGS ?=
check-upstream: setup
	@$(BIN)/python -m conv2dlstm check-upstream --config $(CONFIG) $(CHECK_ARGS)

## forecast: the champion model's forecast from CONFIG's latest input days
forecast: setup
	$(BIN)/snakemake forecast --cores $(CORES) --configfile $(CONFIG)

## tables: regenerate the README's result tables from the results of CONFIG (after make run)
tables: setup
	$(BIN)/python -m conv2dlstm tables --config $(CONFIG) --write README.md

## config: regenerate config/config.yaml from the schema (workflow/schemas/config.schema.yaml)
config: setup
	$(BIN)/python -m conv2dlstm config-defaults --write config/config.yaml

## tables-check: fail when README.md's table for CONFIG is not what its results give
tables-check: setup
	$(BIN)/python -m conv2dlstm tables --config $(CONFIG) --check README.md

## test: every test, end-to-end Snakemake runs included, on TEST_WORKERS pytest-xdist workers (a test
## file's tests stay on one worker; the longest files start first); pytest exit 5, no tests, is not a failure
# --no-loadscope-reorder: pytest-xdist would otherwise hand out the files by their number of tests,
# most first, so the long end-to-end files (few tests each) started last; tests/conftest.py orders them
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

## test-fast: unit tests only
test-fast: PYTEST_ARGS = tests/unit
test-fast: test

## lint: ruff (lint rules and formatting), mypy (src/conv2dlstm, pyproject.toml), the import contracts
## (lint-imports: steps do not import steps, libraries never import steps, no import cycle) and the
## Snakefile's lint
lint: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench workflow
	$(BIN)/mypy
	$(BIN)/snakemake --lint --configfile $(CONFIG)

## report: report.zip (or REPORT), every plot of CONFIG's results, captioned; e.g.
## make report CONFIG=config/seed_no3.yaml REPORT=report-seed.zip
REPORT ?= report.zip
report: setup
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --report $(REPORT)

## mlflow-ui: the MLflow UI on this machine's mlflow.db at MLFLOW_HOST:MLFLOW_PORT; first prints the
## address of CONFIG's training runs
mlflow-ui: setup
	@$(BIN)/python -m conv2dlstm ui-address --config $(CONFIG) --base http://$(MLFLOW_HOST):$(MLFLOW_PORT) --label \
		|| echo "MLflow UI: http://$(MLFLOW_HOST):$(MLFLOW_PORT)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false PYTHONWARNINGS=ignore::DeprecationWarning $(BIN)/mlflow ui \
		--backend-store-uri sqlite:///mlflow.db --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

## mlflow-server: a tracking server for many jobs (a cluster's login node, docs/slurm.md); jobs log to it
## with MLFLOW_TRACKING_URI=http://<host>:$(MLFLOW_PORT) and upload artifacts through it (--serve-artifacts).
## It runs MLflow's authentication (--app-name basic-auth): every request but /health needs a user and
## password (jobs: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in their environment); a user
## reads and changes what they created or were granted, and has MLFLOW_AUTH_PERMISSION (NO_PERMISSIONS,
## or READ) on the rest. Users and grants are in MLFLOW_AUTH_DB; mlflow-auth.ini, written here at each
## start, holds no secret. The admin's password, which creates the user `admin` on the first start,
## comes from MLFLOW_AUTH_ADMIN_PASSWORD in the environment or from the file named by
## MLFLOW_AUTH_ADMIN_PASSWORD_FILE (readable by its owner alone); never from the make command line.
## Files the server creates are its owner's alone (umask 077).
mlflow-server: setup
ifeq ($(origin MLFLOW_AUTH_ADMIN_PASSWORD),command line)
	@echo "mlflow-server: not MLFLOW_AUTH_ADMIN_PASSWORD=... on the command line (ps and the shell history show it):" \
		"export it, or name a file: MLFLOW_AUTH_ADMIN_PASSWORD_FILE=<file readable by you alone>" >&2; exit 2
endif
	@set -e; umask 077; \
	case "$(MLFLOW_AUTH_PERMISSION)" in NO_PERMISSIONS|READ) ;; \
	*) echo "mlflow-server: MLFLOW_AUTH_PERMISSION=$(MLFLOW_AUTH_PERMISSION): NO_PERMISSIONS or READ" >&2; exit 2;; esac; \
	pwfile="$(MLFLOW_AUTH_ADMIN_PASSWORD_FILE)"; \
	if [ -n "$$pwfile" ]; then \
		[ -f "$$pwfile" ] && [ -r "$$pwfile" ] || { echo "mlflow-server: cannot read MLFLOW_AUTH_ADMIN_PASSWORD_FILE $$pwfile" >&2; exit 2; }; \
		[ -z "$$(find -L "$$pwfile" -prune -perm /077)" ] || { \
			echo "mlflow-server: $$pwfile can be read by others: chmod 600 $$pwfile" >&2; exit 2; }; \
		MLFLOW_AUTH_ADMIN_PASSWORD=$$(cat "$$pwfile"); export MLFLOW_AUTH_ADMIN_PASSWORD; \
	fi; \
	[ -n "$${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || { \
		echo "mlflow-server: no admin password. The server runs MLflow's authentication; give the password" \
			"of its admin user (at least 12 characters) in the environment, MLFLOW_AUTH_ADMIN_PASSWORD, or in" \
			"a file readable by you alone: MLFLOW_AUTH_ADMIN_PASSWORD_FILE=<file> (docs/slurm.md)" >&2; exit 2; }; \
	printf '%s\n' "# written by make mlflow-server at each start; no secret: the admin's password comes from the environment" \
		'[mlflow]' "default_permission = $(MLFLOW_AUTH_PERMISSION)" "database_uri = $(MLFLOW_AUTH_DB)" \
		'admin_username = admin' 'authorization_function = mlflow.server.auth:authenticate_request_basic_auth' \
		'auth_cache_ttl_seconds = 60' \
		> "$(CURDIR)/mlflow-auth.ini"; \
	MLFLOW_FLASK_SERVER_SECRET_KEY=$${MLFLOW_FLASK_SERVER_SECRET_KEY:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(32))')}; \
	export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_AUTH_CONFIG_PATH="$(CURDIR)/mlflow-auth.ini" MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false; \
	echo "mlflow server --app-name basic-auth --backend-store-uri $(MLFLOW_BACKEND) --serve-artifacts" \
		"--artifacts-destination $(MLFLOW_ARTIFACTS) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1" \
		"(users: $(MLFLOW_AUTH_DB); others' permission: $(MLFLOW_AUTH_PERMISSION))"; \
	exec $(BIN)/mlflow server --app-name basic-auth --backend-store-uri "$(MLFLOW_BACKEND)" --serve-artifacts \
		--artifacts-destination "$(MLFLOW_ARTIFACTS)" --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers 1

## bench: every CPU benchmark, its table printed and its targets (bench/targets.yaml) checked; runs all
## of them, then fails if one missed a target (about an hour on 2 cores; docs/performance.md)
bench: setup
	rc=0; \
	$(BIN)/python bench/run.py --check || rc=1; \
	$(BIN)/python bench/flops.py --check || rc=1; \
	$(BIN)/python bench/memory_format.py --check || rc=1; \
	$(BIN)/python bench/host_memory.py --check || rc=1; \
	$(BIN)/python bench/scale.py --check || rc=1; \
	$(BIN)/python bench/keras_side_by_side.py --check || rc=1; \
	exit $$rc

## bench-scale: peak memory and time of every step at 1x, 4x, 16x and 64x the default data volume
bench-scale: setup
	$(BIN)/python bench/scale.py --check

## bench-keras: the notebook's network, this project against Keras (creates .venv-keras once, 1.6 GB)
bench-keras: setup
	$(BIN)/python bench/keras_side_by_side.py --check

clean:
	rm -rf results resources .snakemake mlflow.db mlruns report.zip
