# make benchmark : create/reuse the virtual environment, make sure Fashion-MNIST is present,
#                  run the default benchmark offline and print where the leaderboard is.
# make test      : ruff, then the whole test suite (make test-fast skips the slow end-to-end tests).
# make docs      : the documentation site (MkDocs, strict: a broken link fails) in site/.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
# Development data beside the checkout (optional OOD sets); override with DATA_ROOT=/path.
DATA_ROOT ?= $(wildcard ../shared/data)
ifneq ($(strip $(DATA_ROOT)),)
export OODBENCH_DATA_ROOT := $(abspath $(DATA_ROOT))
endif

.PHONY: benchmark test test-fast lint install data perf docs clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,docs]"
	@touch $@

install: $(VENV)/.installed

# Fashion-MNIST: already present (data root, Debian path, download folder), else the Debian
# package when root with apt, else torchvision's download, else say how to get it.
data: install
	@if $(BIN)/python -c "from extract.datasets import load_dataset; load_dataset('fashion-mnist', 'train')" 2>/dev/null; then \
		echo "Fashion-MNIST: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; then \
		echo "Fashion-MNIST: installed the Debian package dataset-fashion-mnist"; \
	elif $(BIN)/oodbench fetch fashion-mnist; then \
		echo "Fashion-MNIST: downloaded with torchvision"; \
	else \
		echo "Fashion-MNIST is missing and could not be obtained. Either install the Debian package as root" >&2; \
		echo "  (apt-get install dataset-fashion-mnist), or run '$(BIN)/oodbench fetch fashion-mnist' with internet" >&2; \
		echo "  access (torchvision download), or put the four idx .gz files in DATA_ROOT/fashion-mnist/." >&2; \
		exit 1; \
	fi

benchmark: data
	$(BIN)/oodbench run fashion-mnist --out $(OUT)
	@echo "leaderboard: $(OUT)/fashion-mnist/cnn28/leaderboard.{md,csv,tex}, report: $(OUT)/fashion-mnist/report.md"

# pytest-xdist workers: one per core, at most 4 (tests/conftest.py gives each its share of threads)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-fast: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# ruff (its rules are in pyproject.toml); make test runs it first
lint: install
	$(BIN)/ruff check .

docs: install
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(OUT) .pytest_cache site

perf: data
	$(BIN)/python -m harness.perf --out $(OUT)/perf.json
