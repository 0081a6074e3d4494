"""Probe a model (plain or DeepSpeed engine) on a trial's benchmarks and probing set, sharded over the workers.

Every rank scores its shard (the same number of forward calls on every rank, which ZeRO-3 requires); per-question
frames are gathered to rank 0 and the perplexity sums are all-reduced. Metrics are named by the registry
(`forgetray.metrics.registry`) for the model state probed: `base`, `sft` or `restored`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pandas as pd
import torch
import torch.distributed as dist

from forgetray import probes
from forgetray.data.passages import load_passage_set
from forgetray.data.instruct import collate
from forgetray.data.questions import load_mc_jsonl
from forgetray.metrics import em_ratio, exact_memorization, perplexity, registry


@dataclass(frozen=True)
class ProbeSuite:
    """What a trial probes: `benchmarks` maps a name to either a question benchmark {"questions": [MCQuestion],
    "shots": [MCQuestion], "score"} or a task {"task": Task, "prompts": [MCPrompt], "score"}; the probing passages;
    the batching; the BOS rule (resolved: "auto" | "always" | "never") and the letter rule of question benchmarks."""

    benchmarks: dict
    passages: list
    n_shot: int
    batch_size: int
    max_length: int
    bos: str = "always"
    letter_rule: str = "merged"
    iv_probe: object = None  # forgetray.train.iv_probe.IVProbe with iv_probe_task (needs the trial's dirs)
    batch_tokens: int = 0  # > 0: multiple-choice calls filled to this many tokens (ProbeOptions.batch_tokens)

    @classmethod
    def load(cls, resolved: dict, trial, dirs: dict | None = None) -> "ProbeSuite":
        from forgetray import tasks

        benchmarks = {}
        for name, bench in resolved["benchmarks"].items():
            if bench["kind"] == "task":
                task = tasks.get(bench["task"])
                prompts = task.load(bench["path"] if bench.get("local") else None)
                benchmarks[name] = {"task": task, "prompts": prompts, "score": bench["score"]}
                continue
            questions = load_questions(bench)
            # k-shot examples are the first k questions, which are then not scored (never a question's own answer).
            shots, scored = questions[: trial.n_shot], questions[trial.n_shot:]
            benchmarks[name] = {"questions": scored, "shots": shots, "score": bench["score"]}
        passages = load_passage_set(resolved["probe_set"], limit=trial.probe_passages)
        dynamics = None
        if getattr(trial, "iv_probe_task", "") and dirs is not None:
            from forgetray.train.iv_probe import IVProbe

            dynamics = IVProbe.load(resolved, trial, dirs)
        return cls(benchmarks, passages, trial.n_shot, trial.probe_batch_size, trial.probe_max_length,
                   resolved.get("bos", "always"), trial.letter_rule, dynamics, trial.probe_batch_tokens)

    def options(self, device, rank: int = 0, world: int = 1) -> probes.ProbeOptions:
        """How this suite's probes run on this rank: its batching, max length and BOS rule."""
        return probes.ProbeOptions(batch_size=self.batch_size, max_length=self.max_length, bos=self.bos,
                                   device=device, shard=(rank, world), batch_tokens=self.batch_tokens)


def load_questions(bench: dict) -> list:
    """A resolved benchmark's questions: a local MMLU-style JSONL file or a hub dataset."""
    if bench.get("kind") == "hub":
        from forgetray.data.hub import load_questions as load_hub_questions

        return load_hub_questions(bench["path"])
    return load_mc_jsonl(bench["path"])


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def memorization(model, examples: list, pad_id: int, batch_size: int, device) -> float:
    """Exact memorization EM over tokenized IFT examples (teacher-forced; response positions only), sharded over
    the ranks with equal batch counts; the counts are summed over ranks."""
    rank, world = _distributed()
    indices, n_real = probes.shard_indices(len(examples), (rank, world))
    counts = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"].clone()
        labels[[j for j, pos in enumerate(range(start, start + len(chunk))) if pos >= n_real]] = -100  # padding copies
        hits, total = exact_memorization(logits.float().cpu(), labels)
        counts += torch.tensor([hits, total], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
    return em_ratio(int(counts[0]), int(counts[1]))


def evaluate(model, tokenizer, suite: ProbeSuite, device, state: str, ift_examples: list | None = None,
             knowledge_only: bool = False) -> tuple[dict, dict]:
    """-> (metrics of model state `state`, per-question frames by benchmark). Both are complete on rank 0 only.

    `ift_examples` adds exact memorization on them (`ift/em`); `knowledge_only` skips perplexity, EM and the IV
    dynamics probe (the cheap probe used at fine-grained steps inside epoch 1)."""
    rank, world = _distributed()
    options = suite.options(device, rank, world)
    metrics: dict[str, float] = {}
    frames: dict[str, pd.DataFrame] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for name, bench in suite.benchmarks.items():
            if "task" in bench:
                # A task follows its own protocol: its prompts may be long (MMLU 5-shot), so up to the model's context.
                local = probes.probe_task(model, tokenizer, bench["task"], bench["prompts"],
                                          replace(options, max_length=_context_length(model, suite.max_length)))
            else:
                local = probes.probe_knowledge(model, tokenizer, bench["questions"], options, n_shot=suite.n_shot,
                                               shots=bench["shots"], letter_rule=suite.letter_rule)
            if world > 1:
                gathered = [None] * world if rank == 0 else None
                dist.gather_object(local, gathered, dst=0)
                local = probes.merge_shards(gathered) if rank == 0 else local
            if rank == 0:
                frames[name] = local
                if "task" in bench:
                    summary = probes.summarize_task(local, bench["task"])
                    metrics.update(registry.task_metrics(state, name, summary))
                    primary = bench["score"]
                else:
                    summary = probes.summarize_knowledge(local)
                    for key, value in summary.items():
                        metrics[registry.BENCH_METRICS[key].name(state=state, bench=name)] = float(value)
                    primary = {"letter": "letter_acc"}.get(bench["score"], bench["score"])
                # The primary knowledge score under one name, so stage analysis needs no per-benchmark logic.
                metrics[registry.KNOWLEDGE.name(state=state, bench=name)] = float(summary[primary])
        if rank == 0:
            metrics.update(_cf_categories(state, metrics))
        if knowledge_only:
            model.train(was_training)
            return metrics, frames
        if suite.iv_probe is not None:  # the instruction-vector dynamics (module of an engine: hooks need it)
            metrics.update(suite.iv_probe.measure(getattr(model, "module", model), tokenizer, state, device, rank,
                                                  world))
        if ift_examples:
            pad_id = probes.padding_id(tokenizer)
            metrics[registry.EM.name(state=state)] = memorization(model, ift_examples, pad_id, suite.batch_size, device)
        ppl, n_tokens = probing_perplexity(model, tokenizer, suite, device, rank, world)
        metrics[registry.PROBE_PPL.name(state=state)] = ppl
        metrics[registry.PROBE_TOKENS.name(state=state)] = float(n_tokens)
    model.train(was_training)
    return metrics, frames


def probing_perplexity(model, tokenizer, suite: ProbeSuite, device, rank: int, world: int) -> tuple[float, int]:
    """(perplexity, tokens) of the probing passages, each rank scoring its shard, summed over the ranks. The caller
    puts the model in eval mode and disables gradients."""
    nll, n_tokens = probes.probe_perplexity(model, tokenizer, suite.passages, suite.options(device, rank, world))
    if world > 1:
        sums = torch.tensor([nll, float(n_tokens)], dtype=torch.float64)
        dist.all_reduce(sums)
        nll, n_tokens = float(sums[0]), int(sums[1])
    return float(perplexity(nll, n_tokens)), n_tokens


def format_metrics(metrics: dict) -> dict:
    """The probes Figure 4 follows along the IFT steps (`steps/<bench>/<key>`), taken from one state's metrics."""
    out = {}
    for name, value in metrics.items():
        found = registry.parse(name)
        if found and found[0].pattern.startswith("{state}/{bench}/") and name.rsplit("/", 1)[1] in registry.FORMAT_KEYS:
            out[registry.STEPS_FORMAT.name(bench=found[1]["bench"], key=name.rsplit("/", 1)[1])] = value
    return out


def _context_length(model, floor: int) -> int:
    """How long a task's prompt may be: the model's context (as lm-eval's default max_length), at least `floor`."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    return max(floor, int(getattr(config, "max_position_embeddings", 0) or 0) or 2048)


def _cf_categories(state: str, metrics: dict) -> dict:
    """CF's category averages (docs/methods.md §7) when the trial probes every task they need, else nothing."""
    from forgetray import tasks

    knowledge = {}
    for name in tasks.suite("cf-categories"):
        value = metrics.get(registry.KNOWLEDGE.name(state=state, bench=name))
        if value is None:
            return {}
        knowledge[name] = value
    return {registry.CF_CATEGORY.name(state=state, key=k): v for k, v in tasks.cf_categories(knowledge).items()}
