# Two entry points (see README): `make demo` and `make test`. Both create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo lint test test-quick venv browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip (not uv/poetry): it honours this machine's torch cap and local wheels (docs/ENVIRONMENT.md)
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/mammo-ray demo --out demo-output

# The report test opens report.html in a real headless browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install chromium (e.g. sudo apt-get install chromium) for the HTML report test" >&2; exit 1; fi; }

# ruff: the lint rules (pyproject.toml [tool.ruff]); lint-imports: the layer contracts in
# pyproject.toml (an import against them fails the run)
lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-output .pytest_cache
