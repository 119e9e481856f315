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

# two pytest workers (pytest-xdist), one file each at a time, so module fixtures are built once: the suite
# (one OpenMP thread per test process, tests/conftest.py) takes about half the wall time on 2 cores
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n $(PYTEST_WORKERS) --dist loadfile
	$(MAKE) docs

# the docs site (site/); --strict turns a broken link, page or API reference into a failure
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict -q

# the main job on the embedded digits data, end to end, on CPU: a paired compare over 3 seeds (3 min 20 s on 2 free cores)
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

# The core files on each processor tier the CPU libraries can be capped to, with 1 and 2 threads: a
# tolerance tuned on one machine must hold on others (issue 27). Not part of `make test` (8 runs, 2-12 min each).
# What changes results: oneDNN's ISA (torch's CPU convolutions), ATen's own kernels (reductions, softmax,
# batch norm, and torch.randn: the AVX2 build draws normals another way than the default and AVX512 ones),
# MKL's GEMM branch, the thread count. MKL ignores MKL_ENABLE_INSTRUCTIONS on AMD processors, where
# MKL_CBWR=COMPATIBLE is the switch that changes its GEMMs. A tier above the CPU is capped by oneDNN and MKL;
# ATen's is set only where the CPU has it (otherwise: illegal instruction).
ISA_FILES = tests/test_core.py tests/test_objectives.py tests/test_loss.py tests/test_pcl.py tests/test_recompute.py
ATEN_HAS = $(shell grep -qw $(1) /proc/cpuinfo 2>/dev/null && echo ATEN_CPU_CAPABILITY=$(2))
ISA_TIERS = "MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default" \
	"MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(call ATEN_HAS,avx2,avx2)" \
	"MKL_ENABLE_INSTRUCTIONS=AVX512 ONEDNN_MAX_CPU_ISA=AVX512_CORE $(call ATEN_HAS,avx512f,avx512)" \
	"MKL_CBWR=COMPATIBLE"
.PHONY: test-isa
test-isa: $(STAMP)
	@failed=""; for tier in $(ISA_TIERS); do for threads in 1 2; do \
		echo "== $$tier OMP_NUM_THREADS=$$threads"; \
		env $$tier OMP_NUM_THREADS=$$threads $(BIN)/python -m pytest -q -p no:cacheprovider $(ISA_FILES) \
			|| failed="$$failed\n  $$tier OMP_NUM_THREADS=$$threads"; \
	done; done; \
	if [ -n "$$failed" ]; then printf "test-isa failed under:$$failed\n"; exit 1; fi
