# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: install demo test test-unit test-integration test-quick test-slow test-gpu bench lint docs docs-serve clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,docs]" "$(TORCH)"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/rcc compress --config config/experiments/demo.yaml

# everything but the deliberately selected slow and gpu tests, in two steps (CI runs this): the unit and
# end-to-end tests, then the integration tests; the second runs even when the first fails
test: install
	@status=0; $(MAKE) --no-print-directory test-unit || status=$$?; \
	$(MAKE) --no-print-directory test-integration || status=$$?; exit $$status

# the two steps of CI, with the 25 slowest tests listed: all but the integration tests, then those
test-unit: install
	$(PY) -m pytest -q --durations=25 -m "not slow and not gpu and not integration"

test-integration: install
	$(PY) -m pytest -q --durations=25 -m "integration and not slow and not gpu"

# the edit-and-test loop (under 2 minutes here): no integration tests, no whole jobs or CLI runs
test-quick: install
	$(PY) -m pytest -q -m "not slow and not gpu and not integration and not e2e"

test-slow: install
	$(PY) -m pytest -q -m slow

test-gpu: install
	$(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/lint-imports

# the documentation site (docs/, mkdocs.yml) into site/; docs-serve previews it at http://127.0.0.1:8000
docs: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) runs site .pytest_cache
