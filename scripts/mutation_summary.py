"""The mutation score per module from mutmut's results in ./mutants (scripts/mutation.sh runs it after mutmut).

Counted as killed: a test failed (or the mutant ran past its CPU-time limit: a timeout, as mutmut counts it).
Every other mutant counts against the score, "no tests" ones included (no test of the selection calls the mutated
function). Survivors that docs/mutation.md lists as equivalent (a mutant name in backquotes in its section
"Equivalent survivors") are shown apart: the score without them is the last column.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}
OTHER = {0: "survived", 5: "no tests", 33: "no tests", None: "not checked"}


def main() -> int:
    metas = sorted((ROOT / "mutants" / "forgetray").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under ./mutants: run scripts/mutation.sh first", file=sys.stderr)
        return 1
    doc = (ROOT / "docs" / "mutation.md").read_text() if (ROOT / "docs" / "mutation.md").exists() else ""
    section = doc.split("## Equivalent survivors", 1)[-1].split("\n## ", 1)[0] if doc else ""
    listed = set(re.findall(r"`(forgetray\.[\w.]+__mutmut_\d+)`", section))
    per_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for meta in metas:
        module = str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")]
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            status = KILLED.get(code) and "killed" or OTHER.get(code, "other")
            if status != "killed" and name in listed:
                status = "equivalent"
            per_module[module][status] += 1
            if status in ("survived", "no tests", "other", "not checked"):
                unexplained.append(f"{name}: {status}")
    totals: Counter = Counter()
    print(f"{'module':38} {'killed':>7} {'total':>6} {'score':>7} {'equiv.':>6} {'score w/o equiv.':>16}")
    for package in ("forgetray/metrics", "forgetray/methods"):
        package_total: Counter = Counter()
        for module, counts in sorted(per_module.items()):
            if module.startswith(package):
                _row(module, counts)
                package_total.update(counts)
        _row(package + " (all)", package_total)
        totals.update(package_total)
    _row("both packages", totals)
    if unexplained:
        print(f"\n{len(unexplained)} mutants neither killed nor listed as equivalent in docs/mutation.md:")
        print("\n".join(unexplained))
    return 0


def _row(label: str, counts: Counter) -> None:
    total = sum(counts.values())
    if not total:
        return
    killed, equivalent = counts["killed"], counts["equivalent"]
    rest = total - equivalent
    print(f"{label:38} {killed:7} {total:6} {100 * killed / total:6.1f}% {equivalent:6} "
          f"{100 * killed / rest if rest else 100:15.1f}%")


if __name__ == "__main__":
    sys.exit(main())
