"""Every metric forgetray logs, declared once (after lm-eval's registered metrics).

A `Metric` is a name pattern with fields in braces (`{state}/{bench}/acc`), what MLflow's `step` means for it,
whether higher is better, and a one-line meaning. Writers build names with `Metric.name(...)`; readers (the
report, the stage analysis, the console) parse them back with `parse`; the README's metric table is
`markdown_table()` (a test keeps the two equal: `python -m forgetray.metrics.registry` prints it). A name that
matches no declared metric cannot be logged (`step_of` raises), so an undeclared metric never reaches MLflow.

Fields: `state` is the model state a probe describes (`base` = the model the trial's IFT starts from, step 0;
`sft` = the IFT checkpoint SFT_e; `restored` = R_e, SFT_e after restoration; `control` = R_0, the start after the
same restoration, step 0); `bench` a benchmark's short name;
`k` the 1-based index of a prior fine-tuning phase; `epoch` a 3-digit IFT epoch; `key` a flatness quantity.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

# What `step` means, per metric, and the report field that carries it (tracking logs each metric at that field).
STEPS = {
    "epoch": ("epoch", "IFT epoch e (0 = the base model)"),
    "optimizer step": ("global_step", "IFT optimizer step (0 = base; points inside epoch 1, then every epoch end)"),
    "restoring step": ("restore_step", "optimizer step of the restoration (0 = before it)"),
    "phase epoch": ("phase_epoch", "epoch of that prior fine-tuning phase"),
    "fine-tuning step": ("ft_step", "fine-tuning step t: 0 = before any, k+1 = after the IFT phase"),
}
# A report may carry earlier points in `series` (a list of reports, each with its own step fields), logged before
# the report's own metrics: the workers send fine-grained points (early IFT steps, a restoration's trajectory) with
# the next checkpoint's report instead of one report each. Ray Train's controller takes one report per poll (every
# 2 s) and a worker's next report waits for it: one report per point cost a quickstart restoration ~6 s.
SERIES = "series"
# A report field: a restarted run reports the checkpoint it resumes from once more, with its location (Ray Train
# records a checkpoint before its callbacks log the report, so a run killed in between would never log it).
RESUMED_FROM = "resumed_from"
STATES = ("base", "sft", "restored", "control")
# control = R_0, the IFT phase's start put through the trial's restoration recipe (docs/methods.md §4): what restoring
# does to an untouched model, the reference of the residual D_R and of the PPL precondition; logged at step 0.
# how the README shows the step per state
PROBE_STATES = {"base": "0", "sft": "epoch", "restored": "epoch", "control": "0"}
FLATNESS_KEYS = ("sc", "ag", "mag", "flatness")
FORMAT_KEYS = ("p_fmt", "entropy_vocab", "entropy_options", "knowledge")  # what Figure 4 follows along the steps
BENCH_SCORES = ("letter_acc", "acc", "acc_norm", "knowledge", "p_fmt", "entropy_vocab", "entropy_options")

_FIELD = re.compile(r"\{(\w+)\}")
_FIELD_PATTERNS = {"bench": r"[^/]+", "k": r"\d+", "epoch": r"\d{3}", "group": r"[^/]+"}
CF_KEYS = ("DK", "Understanding", "Reasoning", "Exams", "AVG")  # CF's evaluation categories (docs/methods.md §7)


@dataclass(frozen=True)
class Metric:
    pattern: str  # e.g. "{state}/{bench}/acc"
    step: str  # a key of STEPS
    higher_is_better: bool | None  # None: neither (a count, a setting, a diagnostic)
    meaning: str
    states: tuple[str, ...] = STATES  # the values `{state}` may take (when the pattern has one)
    keys: tuple[str, ...] = FLATNESS_KEYS  # the values `{key}` may take (when the pattern has one)

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"metric {self.pattern!r}: unknown step meaning {self.step!r}")

    def name(self, **fields: object) -> str:
        """The concrete metric name, e.g. `KNOWLEDGE.name(state="sft", bench="mmlu")`."""
        if set(fields) != set(self.fields):
            raise KeyError(f"metric {self.pattern!r} takes fields {self.fields}, got {sorted(fields)}")
        values = {k: (f"{v:03d}" if k == "epoch" else str(v)) for k, v in fields.items()}
        name = self.pattern.format(**values)
        if not self.regex.fullmatch(name):
            raise ValueError(f"{name!r} does not fit metric pattern {self.pattern!r} "
                             "(an unknown state, or a field holding '/')")
        return name

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(_FIELD.findall(self.pattern))

    @cached_property
    def regex(self) -> re.Pattern:
        out, pos = "", 0
        for match in _FIELD.finditer(self.pattern):
            out += re.escape(self.pattern[pos:match.start()])
            field = match.group(1)
            choices = {"state": self.states, "key": self.keys}
            allowed = "|".join(choices[field]) if field in choices else _FIELD_PATTERNS[field]
            out += f"(?P<{field}>{allowed})"
            pos = match.end()
        return re.compile(out + re.escape(self.pattern[pos:]))


def _probe(leaf: str, higher: bool | None, meaning: str, states: tuple[str, ...] = STATES) -> Metric:
    return Metric("{state}/{bench}/" + leaf, "epoch", higher, meaning, states)


# --- probes of a model state (docs/methods.md §3) ---
LETTER_ACC = _probe("letter_acc", True, "letter-scored accuracy")
ACC = _probe("acc", True, "accuracy by the log-likelihood of each option's continuation (lm-eval's acc)")
ACC_NORM = _probe("acc_norm", True, "length-normalised option-likelihood accuracy")
KNOWLEDGE = _probe("knowledge", True, "the benchmark's primary score (one of the three above)")
P_FMT = _probe("p_fmt", True, "mean format probability P_fmt")
ENTROPY_VOCAB = _probe("entropy_vocab", None, "mean H_V (nats)")
ENTROPY_OPTIONS = _probe("entropy_options", None, "mean H_opt (nats)")
PROBE_PPL = Metric("{state}/probe/ppl", "epoch", False, "probing perplexity")
PROBE_TOKENS = Metric("{state}/probe/tokens", "epoch", None, "tokens scored for it")
EM = Metric("{state}/ift/em", "epoch", None, "exact memorization of the IFT data")
# --- benchmarks by name (forgetray.tasks), beyond acc / acc_norm / knowledge above ---
MC1 = _probe("mc1", True, "TruthfulQA MC1 accuracy (the single true answer ranked first)")
MC2 = _probe("mc2", True, "TruthfulQA MC2: mean normalised probability of the true answers")
GROUP_KEYS = ("acc", "letter_acc")  # the accuracies a benchmark with subjects (MMLU) also reports per group / macro
GROUP_ACC = Metric("{state}/{bench}/group/{group}/{key}", "epoch", True,
                   "accuracy over a group of the benchmark's subjects (MMLU: stem, humanities, social_sciences, other)",
                   keys=GROUP_KEYS)
MACRO_ACC = Metric("{state}/{bench}/macro/{key}", "epoch", True,
                   "mean of the per-subject accuracies (MMLU; acc itself is the micro mean, lm-eval's number)",
                   keys=GROUP_KEYS)
CF_CATEGORY = Metric("{state}/cf/{key}", "epoch", True,
                     "CF's categories: DK, Understanding, Reasoning, Exams (means of their tasks' primary scores), AVG",
                     keys=CF_KEYS)
FLATNESS = Metric("{state}/flatness/{key}", "epoch", False,
                  "loss-surface sharpness SC, AG, MAG and their mean, the flatness degree (docs/methods.md §7)", ("sft",))
# --- training (the IFT phase at step = epoch; a restoration at the restored checkpoint's epoch) ---
TRAIN_LOSS = Metric("train/loss", "epoch", False, "mean IFT loss (response tokens) over the epoch")
TRAIN_TOKENS = Metric("train/tokens", "epoch", None, "IFT tokens (prompt + response) trained in the epoch")
TRAIN_EXAMPLES = Metric("train/examples", "epoch", None, "examples in the IFT phase (with rehearsal: + the replayed)")
TRAIN_TOKENS_PER_S = Metric("train/tokens_per_s", "epoch", True, "training throughput")
TRAIN_EPOCH_SECONDS = Metric("train/epoch_seconds", "epoch", False, "wall time of the epoch")
TRAIN_LR = Metric("train/lr", "epoch", None, "learning rate after the epoch's last step")
IV_TRAIN_KEYS = ("ce", "kl_first", "kl_all", "mse", "kl_first_term", "kl_all_term", "mse_term", "degree")
TRAIN_IV = Metric("train/iv/{key}", "epoch", None,
                  "IV-guided training (iv_task), means over the epoch's steps: ce, kl_first, kl_all, mse (raw; mse only "
                  "with iv_mse > 0), each term as counted in the loss (weighted, thresholded: kl_first_term, "
                  "kl_all_term, mse_term) and the vector's degree; train/loss is their total",
                  keys=IV_TRAIN_KEYS)
IV_EXTRACTION_KEYS = ("clean_prompts", "clean_correct", "corrupted_prompts", "top_cie", "vector_norm")
IV_EXTRACTION = Metric("iv/{key}", "epoch", None,
                       "the instruction vector of IV-guided training, extracted from the IFT phase's start (step 0): "
                       "clean prompts, those answered correctly (averaged), corrupted prompts (CIE), the top head's "
                       "CIE, the vector's norm", keys=IV_EXTRACTION_KEYS)
IV_PROBE_BEHAVIOUR_KEYS = ("acc_zero_shot", "acc_injected", "acc_random", "acc_other", "acc_nshot",
                           "acc_nshot_injected", "acc_nshot_random", "acc_nshot_other", "p_knowledge", "p_instruction")
IV_PROBE_BEHAVIOUR = Metric("{state}/iv_probe/{key}", "epoch", True,
                            "the dynamics probe (iv_probe_task) on the task's queries: zero-shot first-answer-token "
                            "accuracy without (acc_zero_shot) and with the base vector injected (acc_injected) or, "
                            "as controls, random vectors of its norm (acc_random, their mean) and, with "
                            "iv_probe_other_task, that task's base vector (acc_other); n-shot accuracy without and "
                            "with the base vector (acc_nshot, acc_nshot_injected) and the same controls "
                            "(acc_nshot_random, acc_nshot_other); knowledge probability P(y|x) and instruction "
                            "probability P(y_c|c,x)", keys=IV_PROBE_BEHAVIOUR_KEYS)
IV_PROBE_VECTOR_KEYS = ("cosine", "head_overlap")
IV_PROBE_VECTOR = Metric("{state}/iv_probe/{key}", "epoch", True,
                         "the state's own instruction vector against the base's: cosine, top-k head overlap "
                         "(absent when it answers no clean prompt)", keys=IV_PROBE_VECTOR_KEYS)
IV_PROBE_EXTRACTION_KEYS = ("top_cie", "vector_norm")
IV_PROBE_EXTRACTION = Metric("{state}/iv_probe/{key}", "epoch", None,
                             "the state's own vector: its top head's CIE and its norm", keys=IV_PROBE_EXTRACTION_KEYS)
IV_PROBE_OTHER_KEYS = ("other_norm", "other_cosine")
IV_PROBE_OTHER = Metric("{state}/iv_probe/{key}", "epoch", None,
                        "with iv_probe_other_task: the other task's base vector (the control) next to the probe "
                        "task's: its norm and their cosine", states=("base",), keys=IV_PROBE_OTHER_KEYS)
PRIOR_LOSS = Metric("prior/{k}/train/loss", "phase epoch", False,
                    "mean loss of prior fine-tuning phase k (1-based) over each of its epochs")
RESTORE_LOSS = Metric("restored/train/loss", "epoch", False, "mean loss of the restoration that made R_e")
RESTORE_TOKENS = Metric("restored/train/tokens", "epoch", None, "tokens the restoration trained on")
RESTORE_STEPS = Metric("restored/train/steps", "epoch", None, "optimizer steps of the restoration")
RESTORE_PASSES = Metric("restored/train/passes", "epoch", None,
                        "restoration passes over the restoring set (restore_max_passes: until the pattern is back)")
CONTROL_PASSES = Metric("control/train/passes", "epoch", None,
                        "restoration passes that made the control R_0 (step 0)")
# --- along training ---
STEPS_FORMAT = Metric("steps/{bench}/{key}", "optimizer step", None,
                      "the format probes along IFT: p_fmt, entropy_vocab, entropy_options, knowledge (Figure 4)",
                      keys=FORMAT_KEYS)
RESTORE_TRAJECTORY = Metric("restore/probe_ppl/epoch_{epoch}", "restoring step", False,
                            "probing PPL along the restoration of SFT_NNN (Figure 3a; one MLflow chart section, a chart "
                            "per checkpoint)")
# --- the forgetting stage of each checkpoint (docs/methods.md §4) ---
STAGE_CODE = Metric("stage/code", "epoch", None,
                    "stage by the margin rule at stage_margin (the headline): -2 inconclusive, -1 not restored, 0 no, "
                    "1 pseudo, 2 actual forgetting")
MARGIN_KEYS = ("0.01", "0.02", "0.05")  # margin.REPORTED_MARGINS, as written in the names
STAGE_AT_MARGIN = Metric("stage/code_at_{key}", "epoch", None,
                         "the margin rule's stage at margin 0.01, 0.02, 0.05 (codes as stage/code)", keys=MARGIN_KEYS)
INTERVAL_KEYS = ("drop", "drop_low", "drop_high", "residual", "residual_low", "residual_high", "share", "share_low",
                 "share_high", "level")
STAGE_INTERVAL = Metric("stage/{key}", "epoch", None,
                        "the margin rule's quantities: drop D_S = base - SFT_e, residual D_R = R_0 - R_e (knowledge, "
                        "positive = lost), recoverable share (R_e - SFT_e) / (R_0 - SFT_e), each with its bootstrap "
                        "interval, and the intervals' level (Bonferroni over the trial's epochs)", keys=INTERVAL_KEYS)
STAGE_TEST_CODE = Metric("stage/test_code", "epoch", None,
                         "reported variant: stage by paired significance test (stage_test) against base, R_e's PPL "
                         "at most base x (1 + ppl_tolerance); codes as stage/code")
STAGE_FIXED_CODE = Metric("stage/fixed_code", "epoch", None, "reported variant: the same by the fixed threshold tau")
STAGE_D_SFT = Metric("stage/d_sft", "epoch", True, "variants' dS: knowledge of SFT_e minus base")
STAGE_D_RESTORED = Metric("stage/d_restored", "epoch", True, "variants' dR: knowledge of R_e minus base")
STAGE_P_SFT = Metric("stage/p_sft", "epoch", None, "paired-test p-value of dS")
STAGE_P_RESTORED = Metric("stage/p_restored", "epoch", None, "paired-test p-value of dR")
# --- continual learning over the fine-tuning steps t = 0..k+1 (docs/methods.md §9; forgetray.metrics.continual) ---
CONTINUAL_KNOWLEDGE = Metric("continual/{bench}/knowledge", "fine-tuning step", True,
                             "a[t][b]: the benchmark's primary score after fine-tuning step t (0 = before any, "
                             "1..k = after prior phase k, k+1 = the IFT phase's last checkpoint)")
CONTINUAL_FORGETTING = Metric("continual/{bench}/forgetting", "fine-tuning step", False,
                              "max over t < T of a[t][b] - a[T][b], logged at T = k+1 (signed: < 0 = ended above "
                              "every earlier value)")
CONTINUAL_BWT = Metric("continual/bwt", "fine-tuning step", True,
                       "backward transfer: mean over steps i < T with an own benchmark of a[T][own_i] - a[i][own_i], "
                       "logged at T")

METRICS: tuple[Metric, ...] = (
    LETTER_ACC, ACC, ACC_NORM, KNOWLEDGE, P_FMT, ENTROPY_VOCAB, ENTROPY_OPTIONS, MC1, MC2, GROUP_ACC, MACRO_ACC,
    CF_CATEGORY, PROBE_PPL, PROBE_TOKENS, EM, FLATNESS,
    TRAIN_LOSS, TRAIN_TOKENS, TRAIN_EXAMPLES, TRAIN_TOKENS_PER_S, TRAIN_EPOCH_SECONDS, TRAIN_LR, TRAIN_IV,
    IV_EXTRACTION, IV_PROBE_BEHAVIOUR, IV_PROBE_VECTOR, IV_PROBE_EXTRACTION, IV_PROBE_OTHER, PRIOR_LOSS,
    RESTORE_LOSS, RESTORE_TOKENS, RESTORE_STEPS, RESTORE_PASSES, CONTROL_PASSES, STEPS_FORMAT, RESTORE_TRAJECTORY,
    STAGE_CODE, STAGE_AT_MARGIN, STAGE_INTERVAL, STAGE_TEST_CODE, STAGE_FIXED_CODE, STAGE_D_SFT, STAGE_D_RESTORED,
    STAGE_P_SFT, STAGE_P_RESTORED,
    CONTINUAL_KNOWLEDGE, CONTINUAL_FORGETTING, CONTINUAL_BWT,
)
BENCH_METRICS = {m.pattern.rsplit("/", 1)[1]: m for m in (LETTER_ACC, ACC, ACC_NORM, KNOWLEDGE, P_FMT, MC1, MC2,
                                                            ENTROPY_VOCAB, ENTROPY_OPTIONS)}


def task_metrics(state: str, bench: str, summary: dict) -> dict[str, float]:
    """A task's summary (`probes.summarize_task`: acc, acc_norm, letter, mc1, mc2, and for MMLU `<score>_<group>`
    and `<score>_macro`) as declared metric names; a key it cannot place raises."""
    out = {}
    for key, value in summary.items():
        score, _, rest = key.partition("_")
        if key in ("acc_norm",) or not rest:
            score, rest = key, ""
        leaf = "letter_acc" if score == "letter" else score
        if not rest and leaf in BENCH_METRICS:
            out[BENCH_METRICS[leaf].name(state=state, bench=bench)] = float(value)
        elif rest == "macro" and leaf in GROUP_KEYS:
            out[MACRO_ACC.name(state=state, bench=bench, key=leaf)] = float(value)
        elif rest and leaf in GROUP_KEYS:
            out[GROUP_ACC.name(state=state, bench=bench, group=rest, key=leaf)] = float(value)
        else:
            raise KeyError(f"task summary key {key!r} of {bench!r} is not a declared metric")
    return out


def iv_probe_metric(key: str) -> Metric:
    """The declaration of the dynamics probe's quantity `key` (`{state}/iv_probe/<key>`)."""
    for metric in (IV_PROBE_BEHAVIOUR, IV_PROBE_VECTOR, IV_PROBE_EXTRACTION, IV_PROBE_OTHER):
        if key in metric.keys:
            return metric
    raise KeyError(f"{key!r} is not a quantity of the IV dynamics probe")


def parse(name: str) -> tuple[Metric, dict[str, str]] | None:
    """The declared metric a concrete name belongs to, with its fields; None if no declaration matches."""
    for metric in METRICS:
        found = metric.regex.fullmatch(name)
        if found:
            return metric, found.groupdict()
    return None


def step_of(name: str, report: Mapping[str, object]) -> int:
    """The MLflow step of metric `name` in a worker's report (which carries epoch, global_step, ...)."""
    found = parse(name)
    if found is None:
        raise KeyError(f"metric {name!r} is not declared in forgetray.metrics.registry")
    field = STEPS[found[0].step][0]
    if field not in report:
        raise KeyError(f"metric {name!r} is logged per {found[0].step}, but the report has no {field!r}")
    return int(report[field])  # type: ignore[arg-type]


def markdown_table() -> str:
    """The README's metric table: one row per declared metric."""
    rows = ["| metric | step | higher is better | meaning |", "|---|---|---|---|"]
    for m in METRICS:
        if "state" in m.fields:
            shown = ", ".join(f"`{m.pattern.replace('{state}', s)}`" for s in m.states)
            step = " / ".join(dict.fromkeys(PROBE_STATES[s] for s in m.states))
        else:
            shown, step = f"`{m.pattern}`", m.step
        shown = shown.replace("{bench}", "<bench>").replace("{key}", "<key>").replace("{k}", "<k>")
        shown = shown.replace("{epoch}", "NNN")
        better = {True: "yes", False: "no", None: ""}[m.higher_is_better]
        rows.append(f"| {shown} | {step} | {better} | {m.meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
