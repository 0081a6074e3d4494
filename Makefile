# The two commands of the README. Both build .venv first (idempotent).
.PHONY: setup organism quickstart test

setup:
	bash scripts/setup.sh

organism: setup
	.venv/bin/forgetray organism build

quickstart: organism
	.venv/bin/forgetray run sweeps/quickstart.py

# Two test processes: most tests use one core (Ray start-up, servers and DeepSpeed's waits leave the other idle);
# worksteal hands a free process the next test whichever process was given it.
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist worksteal
