# Two commands for a fresh machine: `make demo` (the default NER job) and `make test` (the test suite, what CI runs).
# Each first runs setup.sh when .venv is missing or pyproject.toml/setup.sh changed since the last set-up.
# Extra arguments: make demo ARGS="--crf --num_train_epochs 1"; make test ARGS="tests/test_core.py -x".

PYTHON := .venv/bin/python
STAMP := .venv/.installed
ARGS ?=

.PHONY: demo test setup

demo: $(STAMP)
	$(PYTHON) run_task.py ner $(ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest -q -p no:cacheprovider $(ARGS)

setup: $(STAMP)

# The stamp is written only after a successful set-up, so a failed or interrupted one is retried next time.
$(STAMP): pyproject.toml setup.sh
	bash setup.sh
	touch $(STAMP)
