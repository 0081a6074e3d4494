"""The instruction-vector dynamics probe (issue 12 item 3; the trial's `iv_probe_*` settings): what a checkpoint's
instruction vector and task behaviour look like next to the base's, measured with the other probes of every model
state (`forgetray.train.evaluate`: the base at step 0, SFT_e and R_e), sharded over the trial's workers.

- The **base vector**: extracted from the IFT phase's start by `iv_guided.extract` (clean-prompt filter, CIE on
  `iv_corruption` prompts, top `iv_probe_heads` heads), once per sweep (`keys.iv_probe_key`: the same folder as the
  IV-guided vector when task, prompts and heads agree), saved as `vector.pt`.
- Per model state: its own vector by the same extraction, its cosine with the base vector and the overlap of the two
  top-k head sets (|A ∩ B| / k); the n-shot accuracy (the share of clean prompts answered correctly); zero-shot
  first-answer-token accuracy without and with degree x the **base** vector added at `iv_probe_layer` at the last
  prompt token (re-injection: a training-free restoration), and, as the control the vector must beat, with random
  vectors of the same norm (the mean over RANDOM_VECTORS seeded directions) and, with `iv_probe_other_task`, another
  task's base vector (extracted from the same start by the same extraction, kept in the base vector's folder under
  OTHER_DIR): a recovery the task's vector brings and these do not is the vector's, not any push of the residual
  stream; the n-shot accuracy with the base vector injected too (a model that lost the task in context may regain it
  from the vector), and with the same controls; the knowledge probability P(y|x)
  (the whole answer after the bare query, no instruction or demonstrations) and the instruction probability P(y_c|c,x)
  (after the instruction and the n-shot demonstrations: the clean prompts), each a mean over the queries.
The base's own vector is the base vector (cosine and overlap 1). A state that answers no clean prompt has no vector:
its cosine, overlap, top CIE and norm are not logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from forgetray import iv
from forgetray.iv import dynamics
from forgetray.probes.tokens import encode_pairs, pad_right
from forgetray.train import iv_guided


RANDOM_VECTORS = 3  # random directions of the base vector's norm: acc_random, the control
OTHER_DIR = "other"  # iv_probe_other_task's vector, inside the base vector's folder (keys.iv_probe_key names both)


@dataclass(frozen=True)
class Settings:
    """The trial's iv_probe_* settings and the extraction's prompt counts (iv_prompts, iv_corrupted)."""

    layer: int
    heads: int
    degree: float
    prompts: int
    corrupted: int
    corruption: str


@dataclass
class IVProbe:
    task: iv.Task
    settings: Settings
    bos: str
    max_length: int
    batch_size: int
    seed: int
    base_dir: str  # where the base vector is (iv_probe_dir), read on first use
    other_task: iv.Task | None = None  # iv_probe_other_task: the control vector's task (None: no such control)
    _base: dict | None = field(default=None, repr=False)
    _other: dict | None = field(default=None, repr=False)

    @classmethod
    def load(cls, resolved: dict, trial, dirs: dict) -> "IVProbe":
        settings = Settings(trial.iv_probe_layer, trial.iv_probe_heads, trial.iv_probe_degree, trial.iv_prompts,
                            trial.iv_corrupted, trial.iv_corruption)
        other = resolved.get("iv_probe_other_task")
        return cls(iv_guided.load_task(resolved["iv_probe_task"]), settings, resolved["bos"], trial.max_length,
                   trial.probe_batch_size, trial.seed, dirs["iv_probe_dir"],
                   iv_guided.load_task(other) if other else None)

    @property
    def base(self) -> dict:
        if self._base is None:
            self._base = iv_guided.load(self.base_dir)
        return self._base

    @property
    def other(self) -> dict | None:
        """The other task's base vector (extraction), or None without iv_probe_other_task."""
        if self.other_task is not None and self._other is None:
            self._other = iv_guided.load(Path(self.base_dir) / OTHER_DIR)
        return self._other

    def extract(self, model, tokenizer, device, rank: int, world: int, require_clean: bool,
                task: iv.Task | None = None) -> dict:
        return iv_guided.extract(model, tokenizer, task or self.task, self.settings, self.bos, self.max_length,
                                 self.batch_size, self.seed, device, rank, world, require_clean=require_clean)

    def measure(self, model, tokenizer, state: str, device, rank: int, world: int) -> dict[str, float]:
        """The state's dynamics metrics (`registry.IV_PROBE*`), complete on every rank."""
        from forgetray.metrics import registry
        from forgetray.probes import padding_id

        base = self.base
        own = base if state == "base" else self.extract(model, tokenizer, device, rank, world, require_clean=False)
        s, pad = self.settings, padding_id(tokenizer)
        queries = iv.n_shot_prompts(self.task, s.prompts, self.seed, n_shot=0)  # the clean prompts' queries
        zero_shot = queries[rank::world]
        bare = [_bare(self.task, p) for p in zero_shot]  # x alone: no instruction (a zero-shot prompt has no demos)
        with_context = iv.n_shot_prompts(self.task, s.prompts, self.seed)[rank::world]  # c, x: the clean prompts
        zs, ns = (iv_guided.batches(iv_guided.encode_prompts(tokenizer, prompts, self.bos, self.max_length),
                                    self.batch_size, pad, device) if prompts else []  # more ranks than queries
                  for prompts in (zero_shot, with_context))
        vector = base["vector"].to(device)
        randoms = dynamics.random_like(vector, RANDOM_VECTORS, self.seed)

        def hits(batches, injected=None) -> float:  # correct answers of this rank's share
            return float(dynamics.correct(model, batches, injected, s.layer, s.degree).sum())

        sums = {"acc_zero_shot": hits(zs), "acc_injected": hits(zs, vector),
                "acc_random": sum(hits(zs, r) for r in randoms) / RANDOM_VECTORS,
                "acc_nshot_injected": hits(ns, vector),
                "acc_nshot_random": sum(hits(ns, r) for r in randoms) / RANDOM_VECTORS,
                "p_knowledge": float(dynamics.answer_logprobs(model, self._whole(tokenizer, bare, device)).exp().sum()),
                "p_instruction": float(dynamics.answer_logprobs(
                    model, self._whole(tokenizer, with_context, device)).exp().sum())}
        other = self.other
        if other is not None:  # the control: another task's vector, injected as the base vector is
            sums.update(acc_other=hits(zs, other["vector"].to(device)),
                        acc_nshot_other=hits(ns, other["vector"].to(device)))
        totals = torch.tensor([*sums.values(), float(len(zero_shot))], dtype=torch.float64)
        if world > 1:
            totals = totals.to(device)
            dist.all_reduce(totals)
            totals = totals.cpu()
        values = {key: float(total) / float(totals[-1]) for key, total in zip(sums, totals)}
        values["acc_nshot"] = own["clean_correct"] / own["clean_prompts"]
        if own["vector"] is not None:
            values.update(cosine=dynamics.cosine(own["vector"], base["vector"]),
                          head_overlap=dynamics.head_overlap(own["heads"], base["heads"]),
                          top_cie=own["scores"][0], vector_norm=float(own["vector"].norm()))
        if other is not None and state == "base":
            values.update(other_norm=float(other["vector"].norm()),
                          other_cosine=dynamics.cosine(other["vector"], base["vector"]))
        return {registry.iv_probe_metric(key).name(state=state, key=key): float(v) for key, v in values.items()}

    def _whole(self, tokenizer, prompts: list[iv.Prompt], device) -> list[dict]:
        """Right-padded batches of prompt + whole answer (tokenised as the probes score a continuation), the prompt
        cut from the left so the whole fits max_length."""
        from forgetray.probes import padding_id

        if not prompts:
            return []
        contexts, answers = encode_pairs(tokenizer, [p.text for p in prompts], [[p.answer] for p in prompts],
                                         self.bos)
        rows = []
        for context, (answer,) in zip(contexts, answers):
            keep = max(1, self.max_length - len(answer))
            rows.append((context[-keep:] + answer, min(len(context), keep), len(answer)))
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            ids, mask = pad_right([r[0] for r in chunk], padding_id(tokenizer))
            out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                        "answer_start": torch.tensor([r[1] for r in chunk]),
                        "answer_len": torch.tensor([r[2] for r in chunk])})
        return out


def _bare(task: iv.Task, prompt: iv.Prompt) -> iv.Prompt:
    """The zero-shot prompt without the task's instruction: the query x alone (in the task's template)."""
    if not task.instruction:
        return prompt
    text = prompt.text
    head = task.instruction + task.template.separator
    return iv.Prompt(text[len(head):] if text.startswith(head) else text, prompt.answer)


def extract_base(probe: IVProbe, model, tokenizer, device, rank: int, world: int, out: Path) -> None:
    """The base vector (the IFT phase's start, every rank its share), written by rank 0 into `out`; with
    iv_probe_other_task, that task's vector by the same extraction too, into `out`/OTHER_DIR."""
    found = probe.extract(model, tokenizer, device, rank, world, require_clean=True)
    other = probe.extract(model, tokenizer, device, rank, world, require_clean=True, task=probe.other_task) \
        if probe.other_task is not None else None
    if rank == 0:
        iv_guided.save(found, out)
        if other is not None:
            (out / OTHER_DIR).mkdir()
            iv_guided.save(other, out / OTHER_DIR)
