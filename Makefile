# `make test` and `make demo` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this project is tested with (pip takes it from the local cache where present).
TORCH ?= torch==2.13.0

.PHONY: venv system-blas test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	# torch pinned again here: litdata needs torchvision, whose newest release would otherwise upgrade torch
	$(PY) -m pip install -q -e ".[test,train,plot,eval]" "$(TORCH)"
	touch $@

venv: $(VENV)/.installed

# The optimized BLAS that openelm_mlx loads in front of MLX's reference BLAS on Linux; installed when root with
# apt (CI), otherwise skipped: the tests pass without it.
system-blas:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	    && ! ( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) | grep -q 'libopenblas\.so'); then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread) \
	    || echo "warning: could not install libopenblas0-pthread; MLX keeps its reference BLAS"; \
	fi

test: venv system-blas
	$(PY) -m pytest -q

test-fast: venv system-blas
	$(PY) -m pytest -q -m "not slow"

# The whole pipeline offline on an embedded default; DEMO_ARGS=--fresh starts over.
demo: venv system-blas
	$(PY) -m openelm_mlx.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
