"""Timing two sides of a comparison on a shared, noisy machine, and the table that reports them
(bench_throughput.py's rows).

Each side is timed by wall clock and by this process's CPU time; the sides alternate within every round and the
order flips each round, which cancels slow drift. A row is {"what", "unit", "items", "forgetray": [Stopwatch],
"plain": [Stopwatch]}.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

# A call shorter than this is repeated (the same number of times on every side) so timer resolution and scheduler
# hiccups do not dominate.
MIN_PROBE_SECONDS = 1.0


class Stopwatch:
    """Wall-clock and CPU seconds of a block. With one thread, this process's CPU time is the work it did: other
    processes on a shared machine stretch the wall clock (they take the core away) but barely the CPU time."""

    wall: float
    cpu: float

    def __enter__(self) -> "Stopwatch":
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


Side = Callable[[int], object]  # called with the round number
Check = Callable[[int, dict[str, object]], None]  # (round, each side's result)


def interleaved_rounds(rounds: int, sides: dict[str, Side],
                       after_round: Check | None = None) -> dict[str, list[Stopwatch]]:
    """Run every side once per round, the order flipped every other round; -> Stopwatches by side.
    `after_round(round, results by side)` may check that the sides did the same work."""
    order = list(sides.items())
    times: dict[str, list[Stopwatch]] = {name: [] for name in sides}
    for r in range(rounds):
        results = {}
        for name, run in (order if r % 2 == 0 else order[::-1]):
            with Stopwatch() as clock:
                results[name] = run(r)
            times[name].append(clock)
        if after_round is not None:
            after_round(r, results)
    return times


def timed_row(what: str, unit: str, items: int, rounds: int, *, forgetray: Callable[[], object],
              plain: Callable[[], object]) -> dict:
    """Time two callables that each process `items` items, interleaved over rounds after one untimed warm-up call
    each.

    A call shorter than MIN_PROBE_SECONDS is repeated; both sides repeat the same number of times so they are
    timed over the same amount of work.
    """
    warm = {}
    for name, fn in (("forgetray", forgetray), ("plain", plain)):
        t0 = time.perf_counter()
        fn()
        warm[name] = time.perf_counter() - t0
    repeats = max(1, math.ceil(MIN_PROBE_SECONDS / max(min(warm.values()), 1e-9)))

    def repeated(fn: Callable[[], object]) -> Callable[[int], None]:
        def run(_round: int) -> None:
            for _ in range(repeats):
                fn()
        return run

    times = interleaved_rounds(rounds, {"forgetray": repeated(forgetray), "plain": repeated(plain)})
    return {"what": what, "unit": unit, "items": items * repeats, **times}


def print_table(rows: list[dict], rounds: int) -> None:
    """Per row: each side's median rate (items per wall-clock second) over the rounds and their ratio; the spread of
    the per-round ratios (each round's two sides ran back to back, so drift cancels within a round); and the same
    ratio by CPU time, the one to trust when the machine was busy with other work."""
    header = ("measurement", "unit", "forgetray", "plain", "ratio", f"per-round ({rounds})", "ratio by CPU time")
    lines = []
    for row in rows:
        rate = {side: [row["items"] / c.wall for c in row[side]] for side in ("forgetray", "plain")}
        cpu_rate = {side: [row["items"] / c.cpu for c in row[side]] for side in ("forgetray", "plain")}
        fr, pl = statistics.median(rate["forgetray"]), statistics.median(rate["plain"])
        per_round = [f / p for f, p in zip(rate["forgetray"], rate["plain"])]
        cpu_ratio = statistics.median(cpu_rate["forgetray"]) / statistics.median(cpu_rate["plain"])
        lines.append((row["what"], row["unit"], f"{fr:,.1f}", f"{pl:,.1f}", f"{fr / pl:.3f}",
                      f"{min(per_round):.3f} .. {max(per_round):.3f}", f"{cpu_ratio:.3f}"))
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    aligns = "<<>>>>>"
    for line in [header] + lines:
        print("  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(line, aligns, widths)))
    print("ratio = forgetray / plain (1.0 = no overhead), from the medians over interleaved rounds")
