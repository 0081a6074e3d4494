# The two commands of the README. Both build .venv first (idempotent).
.PHONY: setup organism quickstart test

setup:
	bash scripts/setup.sh

organism: setup
	.venv/bin/forgetray organism build

quickstart: organism
	.venv/bin/forgetray run sweeps/quickstart.py

# Two test processes, one per core: together they keep the cores ~93% busy (docs/testing.md; three did not help).
# conftest puts the slow tests first; `--dist load --maxschedchunk 2` hands them out two at a time, so each process
# takes the next one as it frees (worksteal's first split gave one process every slow test).
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist load --maxschedchunk 2
