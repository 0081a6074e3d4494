"""Benchmarks by name with their standard protocol: each task turns its dataset's rows into `MCPrompt`s exactly as
lm-eval 0.4.13 (or, for tasks lm-eval lacks, OpenCompass) prompts them. Pure: datasets and text; no model, no torch,
Ray, MLflow or DeepSpeed; `datasets` is imported only when rows are loaded.

    from forgetray import tasks
    tasks.get("mmlu").load()                  # hub rows (or $FORGETRAY_TASK_DATA/mmlu) -> list[MCPrompt]
    tasks.get("mmlu").load("/data/mmlu")      # local files of the hub's schema: <dir>/<subject>/<split>.parquet|jsonl|json
    tasks.load("arc_challenge@/data/arc")     # the same from a spec string
    tasks.suite("cf-suite")                   # task names
    tasks.cf_categories({name: acc, ...})     # CF's DK / Understanding / Reasoning / Exams / AVG

docs/benchmarks.md lists every task: source, splits, shots, scores, category.
"""

from forgetray.tasks.base import DATA_ENV, Task
from forgetray.tasks.registry import CF_CATEGORIES, SUITES, TASKS, cf_categories, get, load, names, parse_spec, suite

__all__ = ["CF_CATEGORIES", "DATA_ENV", "SUITES", "TASKS", "Task", "cf_categories", "get", "load", "names",
           "parse_spec", "suite"]
