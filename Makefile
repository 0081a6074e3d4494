# The two commands of the README. Both build .venv first (idempotent).
.PHONY: setup organism quickstart test

setup:
	bash scripts/setup.sh

organism: setup
	.venv/bin/forgetray organism build

quickstart: organism
	.venv/bin/forgetray run sweeps/quickstart.py

test: setup
	.venv/bin/python -m pytest -q
