# Set-up is two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv if needed and (re)install only when pyproject.toml or the
# pinned constraints change, so running them again is cheap (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.qkvlab-installed
TORCH  := torch==2.13.0

.PHONY: demo test test-slow lint format bench clean browser

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: the CPU wheel on disk. Nothing later may swap it for a CUDA build.
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev,lightning]'
	$(PIP) list 2>/dev/null | grep -E '^torch ' | grep -q '2.13.0' || { echo "torch is not 2.13.0"; exit 1; }
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qkvlab demo --out runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# The report's browser test drives Debian's chromium (a browser that downloads its own build cannot
# work offline). Installed with apt-get when missing; where that fails the test is skipped, saying why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  APT=apt-get; [ "$$(id -u)" = 0 ] || APT="sudo -n apt-get"; \
	  { $$APT install -y -qq chromium chromium-driver || { $$APT update -qq && $$APT install -y -qq chromium chromium-driver; }; } >/dev/null 2>&1 \
	  || echo "make: could not install chromium with apt-get; the browser test will be skipped"; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

# Benchmarks never run in CI. They need the `bench` extra (WeightWatcher, psutil, TransformerLens).
bench: $(STAMP)
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev,lightning,bench]'
	$(PY) benchmarks/bench_spectra.py
	$(PY) benchmarks/bench_inspect_vs_weightwatcher.py
	$(PY) benchmarks/bench_streaming.py
	$(PY) benchmarks/bench_muon.py
	$(PY) benchmarks/bench_logits.py

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
