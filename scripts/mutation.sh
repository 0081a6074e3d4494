#!/usr/bin/env bash
# Mutation testing of the pure layers, forgetray/metrics and forgetray/methods, against their fast tests
# (README "Tests", docs/mutation.md). Configuration: [tool.mutmut] in pyproject.toml (which files are mutated, which
# tests run). mutmut copies the package and the tests into ./mutants and runs, for each mutant, only the tests that
# call the mutated function, one mutant at a time (--max-children 1: the test machine has 2 shared cores).
#
#   bash scripts/mutation.sh            a clean run (removes ./mutants first), then the summary per module
#   bash scripts/mutation.sh --keep     reuse ./mutants: only mutants without a result are run (after a stop)
#
# Needs mutmut (the test extra: pip install -e '.[test]'). A full run: 37 minutes on the 2-core test machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ "${1:-}" != "--keep" ]]; then rm -rf mutants; fi
nice -n 15 "$(dirname "$PY")/mutmut" run --max-children 1 || true  # the summary below is the result
"$PY" scripts/mutation_summary.py
