# kn-ray: two commands do all the set-up on a fresh machine.
#   make demo   install, fetch the embedded model, run the demo job
#   make test   install, fetch the embedded model, run the tests
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install model browser test test-numerics test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA wheels
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(BIN)/kn-ray fetch smollm2

# the browser test drives Debian's Chromium (never a downloaded one); installed where we may (root + apt)
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } \
		|| echo "make: installing Chromium failed: the browser test will skip"; \
	else echo "make: no Chromium here and no root apt-get to install it: the browser test will skip"; fi

test: install model browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the comparison-heavy tests under 1/2 threads, ATEN_CPU_CAPABILITY default/avx2/avx512, small/large batches
test-numerics: install model
	$(BIN)/python tests/numerics_matrix.py

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install model
	$(BIN)/kn-ray run jobs/demo.yaml

bench: install model
	$(BIN)/kn-ray bench --model smollm2 --model bert-base-random --prompts 8

clean:
	rm -rf $(VENV) out build *.egg-info
