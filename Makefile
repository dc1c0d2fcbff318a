# Two commands on a fresh machine: `make generate` and `make test` (see README.md).
# Pass script options with ARGS, e.g. `make train ARGS="--max_iters=200 --d_model=64"`.
PYTHON := .venv/bin/python
VENV := .venv/requirements.installed

.PHONY: venv data shakespeare generate train eval visualize bench test

# The venv is made once; a changed requirements.txt reinstalls (the stamp is a copy of it).
$(VENV): requirements.txt
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	cp requirements.txt $@

venv: $(VENV)

data: $(VENV)
	$(PYTHON) data.py

# Tiny Shakespeare (char-rnn's input.txt, checksum checked): `make train ARGS=--preset=shakespeare`.
shakespeare: $(VENV)
	$(PYTHON) data.py tinyshakespeare

generate: $(VENV)
	$(PYTHON) generate.py $(ARGS)

train: $(VENV) data
	$(PYTHON) train.py $(ARGS)

eval: $(VENV) data
	$(PYTHON) eval.py $(ARGS)

visualize: $(VENV) data
	$(PYTHON) visualize.py $(ARGS)

bench: $(VENV)
	$(PYTHON) bench.py $(ARGS)

# One pytest worker per core (pytest-xdist): the tests are mostly single-threaded compiles.
test: $(VENV) data
	$(PYTHON) -m pytest -q -n auto $(ARGS)
