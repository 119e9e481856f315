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

# the main job on the embedded digits data, end to end, on CPU (about a minute on 2 free cores; README: OMP_NUM_THREADS=1 on a busy machine)
demo: $(STAMP)
	$(BIN)/headsurgeon demo

coverage: $(STAMP)
	$(BIN)/python benchmarks/coverage.py

clean:
	rm -rf $(VENV) build site *.egg-info

# The core (split, collapse, export/reload: tests/test_core.py; one training run: test_train.py's first test)
# against the oldest timm pyproject.toml allows, in a venv under /tmp layered over .venv: the same torch
# and everything else, only timm differs (installed there with --no-deps).
TIMM_FLOOR = $(shell sed -n 's/.*"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
FLOOR_VENV = /tmp/headsurgeon-timm-$(TIMM_FLOOR)
.PHONY: test-timm-floor
test-timm-floor: $(STAMP)
	test -x $(FLOOR_VENV)/bin/python || $(BIN)/python -m venv $(FLOOR_VENV)  # venv from a venv: on the base interpreter
	$(FLOOR_VENV)/bin/python -m pip install -q --no-deps timm==$(TIMM_FLOOR)
	$(BIN)/python -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		> $$($(FLOOR_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz_headsurgeon_venv.pth
	$(FLOOR_VENV)/bin/python -c "import timm; assert timm.__version__ == '$(TIMM_FLOOR)', timm.__version__; print('timm', timm.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_core.py \
		tests/test_train.py::test_train_writes_metrics_summary_checkpoints_and_curves
