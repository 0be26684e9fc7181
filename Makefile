# Two commands set everything up on a fresh machine (only Python and pip needed):
#   make demo   - distill the shipped tiny teacher into the base student at four LSPs, report
#   make test   - the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# pip picks the build of torch (see README: Install); TORCH_SPEC may add pip options, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test,gguf,tracking]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/essence demo --out runs/demo

.PHONY: install test demo
