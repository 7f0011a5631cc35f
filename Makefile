# Stick-breaking attention: the course's and the library's commands.
#
#   make grade     set everything up (first time only), then grade the lessons
#   make test      set everything up (first time only), then run the test suite
#
# Run `make help` for the rest. Needs GNU make, bash and Python >= 3.10 (`python3`, or
# `make PYTHON=python3.12 ...` to pick another interpreter).

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV := $(ROOT)/.venv
VPY := $(VENV)/bin/python
BUILD := $(ROOT)/.build
# Written last by a successful install; lives inside .venv so that deleting .venv redoes everything.
STAMP := $(VENV)/.sb-ref-installed

# Extra arguments for pytest, the grader and the benchmark, e.g. make test PYTEST_ARGS="-m gpu"
PYTEST_ARGS ?=
# make test's pytest worker processes (pytest-xdist): auto is one per core, 0 runs everything in one process.
# Each test file runs on one worker (--dist loadfile), in the order tests/conftest.py gives (longest first,
# --no-loadscope-reorder): a file's tests share its fixtures (the nbgrader round trip), and the lessons' GPU runs,
# which time the GPU, go one at a time.
TEST_WORKERS ?= auto
GRADE_ARGS ?=
BENCH_ARGS ?=
LAB_ARGS ?=

# grade, test, lab, release and bench run with these: Jupyter, IPython, matplotlib, Triton and
# PyTorch keep their settings and caches in .build/ inside the repository, not in the user's home.
# `make env` prints them.
ISOLATION := \
	JUPYTER_CONFIG_DIR=$(BUILD)/jupyter/config \
	JUPYTER_DATA_DIR=$(BUILD)/jupyter/data \
	JUPYTER_RUNTIME_DIR=$(BUILD)/jupyter/runtime \
	JUPYTER_PLATFORM_DIRS=1 \
	IPYTHONDIR=$(BUILD)/ipython \
	MPLCONFIGDIR=$(BUILD)/matplotlib \
	TRITON_HOME=$(BUILD)/triton \
	TRITON_CACHE_DIR=$(BUILD)/triton/cache \
	TORCH_HOME=$(BUILD)/torch \
	TORCHINDUCTOR_CACHE_DIR=$(BUILD)/torchinductor \
	CUDA_CACHE_PATH=$(BUILD)/cuda \
	XDG_CACHE_HOME=$(BUILD)/cache
# ... with .venv/bin first on PATH, as in an activated venv (nbgrader runs its own tools by name).
ACTIVATED := PATH="$(VENV)/bin:$$PATH" $(ISOLATION)
RUN := $(ACTIVATED) $(VPY)

.PHONY: help install grade test lab release bench env clean distclean

help:
	@echo "Stick-breaking attention: course and library"
	@echo
	@echo "  make grade      install if needed, then grade the lesson notebooks (python -m autograder)"
	@echo "  make test       install if needed, then run the test suite (GPU tests skip without a GPU)"
	@echo "  make install    create .venv and install the pinned course environment and sb_ref (editable)"
	@echo "  make lab        open JupyterLab on lessons/"
	@echo "  make release    instructors: generate lessons/ from solutions/ with nbgrader"
	@echo "  make bench      speed and accuracy benchmarks against PyTorch attention (needs a CUDA GPU)"
	@echo "  make env        print the environment variables the commands above run with"
	@echo "  make clean      remove build outputs and caches (keeps .venv)"
	@echo "  make distclean  clean, and remove .venv too"
	@echo
	@echo "  Extra arguments: PYTEST_ARGS=\"...\" and TEST_WORKERS=N (make test; 0: one process), GRADE_ARGS=\"...\" (make grade), BENCH_ARGS=\"...\" (make bench),"
	@echo "  LAB_ARGS=\"...\" (make lab, e.g. --no-browser)."

install: $(STAMP)

$(STAMP): $(ROOT)/requirements.lock $(ROOT)/pyproject.toml
	@if [ ! -x "$(VPY)" ]; then \
	  if ! command -v "$(PYTHON)" >/dev/null 2>&1; then \
	    echo "error: '$(PYTHON)' not found. Install Python 3.10 or newer, or name one: make install PYTHON=/path/to/python3" >&2; \
	    exit 1; \
	  fi; \
	  if ! "$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then \
	    echo "error: $(PYTHON) is Python $$("$(PYTHON)" -c 'import platform; print(platform.python_version())'); this project needs Python 3.10 or newer." >&2; \
	    echo "       Install one and name it, for example: make install PYTHON=python3.12" >&2; \
	    exit 1; \
	  fi; \
	  echo "Creating .venv with $$("$(PYTHON)" -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	  if ! "$(PYTHON)" -m venv "$(VENV)"; then \
	    rm -rf "$(VENV)"; \
	    echo "error: '$(PYTHON) -m venv' failed. On Debian or Ubuntu, install the venv module first:" >&2; \
	    echo "       sudo apt install python3-venv" >&2; \
	    exit 1; \
	  fi; \
	fi
	@if ! "$(VPY)" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then \
	  echo "error: .venv does not hold a working Python >= 3.10. Remove it (make distclean) and try again." >&2; \
	  exit 1; \
	fi
	"$(VPY)" -m pip install --disable-pip-version-check -r "$(ROOT)/requirements.lock"
	"$(VPY)" -m pip install --disable-pip-version-check --no-build-isolation -e "$(ROOT)"
	@touch "$@"
	@echo "Installed: $$("$(VPY)" -c 'import sys, torch, triton; print("Python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__)')"

grade: $(STAMP)
	@mkdir -p "$(BUILD)"
	@echo ".venv/bin/python -m autograder $(GRADE_ARGS)"
	@cd "$(ROOT)" && $(RUN) -m autograder $(GRADE_ARGS)

test: $(STAMP)
	@mkdir -p "$(BUILD)"
	@echo ".venv/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)"
	@cd "$(ROOT)" && $(RUN) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lab: $(STAMP)
	@mkdir -p "$(BUILD)"
	@echo ".venv/bin/jupyter lab --ServerApp.root_dir=lessons $(LAB_ARGS)"
	@cd "$(ROOT)" && $(ACTIVATED) "$(VENV)/bin/jupyter" lab --ServerApp.root_dir="$(ROOT)/lessons" $(LAB_ARGS)

# lessons/ is generated from solutions/ by nbgrader, one assignment folder per lesson. nbgrader_config.py makes the
# stubs name their task and strips outputs, execution counts and per-machine metadata from the release;
# tests/test_lessons.py fails when the committed lessons/ differs from a fresh release.
release: $(STAMP)
	@cd "$(ROOT)"; \
	shopt -s nullglob; \
	notebooks=(solutions/*/*.ipynb); \
	if [ $${#notebooks[@]} -eq 0 ]; then \
	  echo "solutions/ holds no lesson notebooks yet: there is nothing to release."; \
	  exit 0; \
	fi; \
	if [ ! -f nbgrader_config.py ]; then \
	  echo "error: solutions/ has notebooks but nbgrader_config.py is missing; nbgrader needs it to release." >&2; \
	  exit 1; \
	fi; \
	mkdir -p "$(BUILD)"; \
	for dir in solutions/*/; do \
	  lesson=$$(basename "$$dir"); \
	  ls "$$dir"*.ipynb >/dev/null 2>&1 || continue; \
	  echo "nbgrader generate_assignment $$lesson"; \
	  $(ACTIVATED) "$(VENV)/bin/nbgrader" generate_assignment "$$lesson" --force; \
	done; \
	if grep -l -E "BEGIN SOLUTION|END SOLUTION|BEGIN HIDDEN TESTS|END HIDDEN TESTS" lessons/*/*.ipynb; then \
	  echo "error: the release above still holds solution or hidden-test markers" >&2; \
	  exit 1; \
	fi; \
	echo "lessons/ regenerated from solutions/ (stubs, no outputs, no hidden tests): review with git diff, then commit it."

bench: $(STAMP)
	@if [ ! -f "$(ROOT)/benchmarks/bench_attention.py" ]; then \
	  echo "error: benchmarks/bench_attention.py does not exist." >&2; exit 1; \
	fi
	@if ! "$(VPY)" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
	  echo "error: make bench needs a CUDA GPU, and PyTorch sees none here." >&2; exit 1; \
	fi
	@mkdir -p "$(BUILD)"
	@echo ".venv/bin/python benchmarks/bench_attention.py $(BENCH_ARGS)"
	@cd "$(ROOT)" && $(RUN) benchmarks/bench_attention.py $(BENCH_ARGS)

env:
	@for assignment in $(ISOLATION); do echo "export $$assignment"; done

clean:
	rm -rf "$(BUILD)" "$(ROOT)/build" "$(ROOT)/dist" "$(ROOT)/.pytest_cache"
	find "$(ROOT)" \( -path "$(VENV)" -o -path "$(ROOT)/.git" \) -prune -o \( -name __pycache__ -o -name '*.egg-info' -o -name .ipynb_checkpoints \) -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf "$(VENV)"
