# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean coverage docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,docs]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra
	$(MAKE) docs

# the docs site (site/); --strict turns a broken link, page or API reference into a failure
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict -q

# the main job on the embedded digits data, end to end, on CPU (about 5 minutes on 2 cores)
demo: $(STAMP)
	$(BIN)/headsurgeon demo

coverage: $(STAMP)
	$(BIN)/python benchmarks/coverage.py

clean:
	rm -rf $(VENV) build site *.egg-info
