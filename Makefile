# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean install system-deps docs

# torch is installed first, pinned, from the CPU wheel on disk (/opt/wheels) when present, so
# that nothing resolves a newer CUDA build from the registry.
TORCH := torch==2.13.0
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND_LINKS) '$(TORCH)'
	$(BIN)/pip install -q $(FIND_LINKS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/veil demo

# Debian packages the tests need (a real redis-server for the cluster tests), installed when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }

# The documentation (mkdocs.yml, docs/) is built in strict mode, so a broken link or API reference
# fails `make test`. No --quiet: mkdocs 1.6.1 then drops the warnings before strict mode counts them.
DOCS := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(VENV)/site

# The suite runs as two pytest sessions (ml and serve, then the rest) so that the workers restart
# half way: SEAL's memory pool keeps every size a worker has ever allocated, so a worker's memory
# is the high-water mark of all the files it ran. Measured here (24 GB machine): one session peaked
# at 22.6 GB used, the two at 18.7 GB, in about the same time (15.7 vs 14.8 min).
test: $(STAMP) system-deps
	$(BIN)/ruff check src tests benchmarks
	$(DOCS)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests/ml tests/serve
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --ignore=tests/ml --ignore=tests/serve

docs: $(STAMP)
	$(DOCS)

bench: $(STAMP) system-deps
	$(BIN)/python benchmarks/he_linear.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info .pytest_cache .ruff_cache
