# Quickstart targets. `make demo` and `make test` each create .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first: on a CPU box `torch==2.13.0` is the local CPU wheel; a bare `torch` would pull CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
# `make demo`: image → 3D on the CPU with the bundled demo pipeline (d3s2/assets/demo_pipeline); without it,
# `d3s2 demo` says so and runs the mesh → sparse SDF → watertight mesh demo.
DEMO_IMAGE ?= examples/horse_lusitano.png

.PHONY: demo test lint install install-dev chromium clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[data,cond,train]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@# CUDA torch brings its own triton; a CPU box gets the extra (the kernels' tests in Triton's interpreter)
	extras=dev; $(PY) -c "import triton" 2>/dev/null || extras=dev,triton; \
	$(PY) -m pip install -q -e ".[$$extras]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(VENV)/bin/d3s2 demo --image $(DEMO_IMAGE) --out out/demo

# Headless Chromium + ChromeDriver for tests/app/test_browser.py (Debian packages; only when missing).
chromium:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    chromium chromium-driver fonts-liberation; \
	else echo "note: no chromium/chromedriver (as root: apt-get install chromium chromium-driver);" \
	  "the browser test will be skipped"; fi

test: $(VENV)/.installed-dev chromium
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out build *.egg-info
