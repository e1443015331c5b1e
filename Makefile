# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test fuzz chaos demo s3 bench lint format clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt ckptstore/loading/_verified_copy.c ckptstore/state/_tensor_fields.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check ckptstore backends tools tests
	$(PY) -m pytest -q

# Long property-based fuzzing of the manifest parser and read path: FUZZ_SECONDS per property
# (two properties; make test runs one short round of each).
FUZZ_SECONDS ?= 300
fuzz: $(STAMP)
	CKPTSTORE_FUZZ_SECONDS=$(FUZZ_SECONDS) CKPTSTORE_FUZZ_EXAMPLES=2000 $(PY) -m pytest -q -s \
		tests/test_fuzz_manifest.py -k fuzz_ --timeout 0

# The crash campaign: CHAOS_TRIALS ranks killed at named phases and random moments, seeded.
CHAOS_TRIALS ?= 200
CHAOS_SEED ?= 1
chaos: $(STAMP)
	$(PY) tools/chaos.py --trials $(CHAOS_TRIALS) --seed $(CHAOS_SEED)

demo: $(STAMP)
	$(PY) tools/demo.py

# The demo's S3 server again, over the data `make demo` left (for the docs/cli.md examples).
s3: $(STAMP)
	$(PY) tools/s3_server.py

bench: $(STAMP)
	$(PY) tools/bench.py

lint: $(STAMP)
	$(PY) -m ruff check ckptstore backends tools tests
	$(PY) -m ruff format --check ckptstore backends tools tests

format: $(STAMP)
	$(PY) -m ruff format ckptstore backends tools tests
	$(PY) -m ruff check --fix ckptstore backends tools tests

clean:
	rm -rf $(VENV) build *.egg-info
