"""What a trial is: its configuration, validated on construction.

`TrialConfig` is the single source of truth for every setting's name, type, default and bounds. A `Sweep` is a name plus
a value or a `grid([...])` for any of those settings; it expands to the cartesian product of its grids (optionally
replicated over seeds), and every point is a validated `TrialConfig`: `forgetray.grids` (`Sweep`, `Grid`, `grid`,
`replicate_group`, `parse_override`, `flatten`), which imports this module. Only plain data lives here: resolving
a model or dataset name to files is `forgetray.resources` (`resolve_sweep`), which runs before any compute starts; the
plan of a trial's training is `forgetray.plan`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from forgetray.spec_iv import check_iv


class SpecError(ValueError):
    """A sweep or trial setting is invalid. The message is one line naming the setting (and file/line if any)."""


PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "constant", "step")  # "step": x lr_decay per epoch (CF, docs/methods.md §1)
KNOWLEDGE_SCORES = ("letter", "acc", "acc_norm", "mc1", "mc2")  # which a benchmark offers: forgetray.resources
BOS_RULES = ("model", "auto", "always", "never")
LETTER_RULES = ("merged", "lm_eval")
STAGE_TESTS = ("mcnemar", "bootstrap")
KEPT_STATES = ("latest", "all")  # which checkpoints of a running phase keep DeepSpeed state


@dataclass(frozen=True)
class TrialConfig:
    """One point of a sweep: everything a trial needs, fully resolved. Field order is the order shown to users."""

    # --- the study's axes ---
    model: str = "organism-small"  # organism size name, Hugging Face hub id, or local model directory
    dataset: str = "organism-alpaca"  # organism IFT set name, hub dataset id, or local Alpaca .json/.jsonl file
    epochs: int = 3  # IFT epochs; a checkpoint (and a probe) after each
    # --- optimisation (docs/methods.md §1; weight decay 0 and cosine with 3% warm-up are our choices) ---
    lr: float = 1e-3
    batch_size: int = 16  # global batch: sequences per optimizer step, over all workers
    micro_batch_size: int = 0  # per worker per forward pass; 0 = batch_size / workers (no accumulation)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    lr_decay: float = 0.85  # "step" schedule: epoch e trains at lr * lr_decay^(e-1) (CF: 0.85); unused otherwise
    seed: int = 0
    max_length: int = 256  # IFT sequences are truncated to this many tokens
    # --- distribution, faults and storage (README: "Checkpoints and storage") ---
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    workers: int = 1  # Ray Train workers (DeepSpeed ranks) per trial
    gpus_per_worker: int = 0  # 0 = CPU (DeepSpeed's CPU accelerator over gloo)
    cpus_per_worker: int = 1
    precision: str = "fp32"
    # --- speed (README "Performance settings"): how the training phases compute, not what ---
    packing: bool = False  # instruction micro-batches as one row without padding (attention within each example)
    compile: bool = False  # the model under torch.compile in every training phase
    chunked_loss: int = 0  # cross-entropy over the scored positions this many at a time, no full logits; 0 = off
    max_failures: int = 1  # a failed trial restarts from its last checkpoint this many times
    keep_optimizer_state: str = "latest"  # DeepSpeed state of a running phase: its newest checkpoint | "all"
    delete_finished_state: bool = True  # drop a phase's DeepSpeed state once it finished (models and probes stay)
    # --- probes (docs/methods.md §3) ---
    benchmarks: tuple = ("organism-facts",)  # MC benchmark names or local MMLU-style .jsonl files
    primary_score: tuple = ()  # per-benchmark primary knowledge score: {"bench": "letter"|"acc"|"acc_norm"|...}
    n_shot: int = 0  # in-context examples in the letter-scored prompt of question files (tasks: their own protocol)
    bos: str = "model"  # BOS before probe prompts: "model" = organism "always", others "auto" (the tokenizer's rule)
    letter_rule: str = "merged"  # letter scoring of question files: " A"/"A" merged (PS) or "lm_eval" (" A" only)
    probe_set: str = "organism-probe"  # probing-perplexity passages: name or local .jsonl with a "text" field
    probe_passages: int = 500  # how many passages of the probing set are scored
    probe_max_length: int = 256
    probe_batch_size: int = 32
    probe_batch_tokens: int = 0  # > 0: multiple-choice probe calls hold this many tokens, not probe_batch_size rows
    early_checkpoints: int = 0  # extra probe points inside epoch 1 (evenly spaced steps), to locate format alignment
    em_examples: int = 0  # IFT examples scored for exact memorization EM; 0 = all of them
    # --- restoration (docs/methods.md §2) and the stage rule (§4) ---
    restore_pool: str = ""  # plain-text pool (name or .jsonl); "" = no restoration
    restore_lr: float = 3e-5
    restore_batch_size: int = 16  # global batch of packed sequences
    restore_weight_decay: float = 0.0  # restoration's own AdamW and schedule (not the IFT phase's)
    restore_warmup_ratio: float = 0.03
    restore_lr_schedule: str = "cosine"
    restore_seq_len: int = 256  # restoring text is packed into sequences of this length
    restore_trajectory_points: int = 10  # probing-PPL measurements along each restoration (Figure 3a)
    # restore again (a fresh one-pass restoration of the result) while R_e's probing PPL is above R_0's x
    # (1 + ppl_tolerance; R_0's own passes: the base's), at most this many passes in all; 1 = one pass
    restore_max_passes: int = 1
    # checkpoints restored one after another by one TorchTrainer; groups run concurrently. 0: in the IFT phase's
    # TorchTrainer, after it (one worker start-up per trial: the cheapest on a small machine)
    restore_group: int = 1
    # the margin rule (the headline verdict): the smallest knowledge loss that matters, in accuracy points
    stage_margin: float = 0.02
    stage_alpha: float = 0.05  # the intervals' family-wise level over a grid point's epochs; the test variant's alpha
    stage_test: str = "mcnemar"  # reported variant: the paired test deciding a significant drop: "mcnemar" | "bootstrap"
    stage_tau: float = 0.02  # reported variant: the fixed-threshold rule's drop threshold on accuracy
    ppl_tolerance: float = 0.05  # R_e's probing PPL must be within this fraction of R_0's (either side)
    # --- anti-forgetting methods (docs/methods.md §5-6) and flatness (§7); they act on the trial's IFT phase ---
    sam_rho: float = 0.0  # SAM radius; 0 = plain AdamW
    sam_adaptive: bool = False  # ASAM: perturbation scaled by |w|
    sam_every: int = 1  # a SAM step every k-th optimizer step (the others are plain)
    wiseft_alpha: float = 1.0  # each checkpoint becomes (1-a)*theta_0 + a*theta_1, theta_0 = the phase's start; 1 = off
    rehearsal_ratio: float = 0.0  # share of the previous phase's data replayed in this phase (needs prior_phases)
    prior_phases: tuple = ()  # fine-tuning phases before IFT, in order: dicts of PHASE_KEYS; unset keys = plain IFT
    flatness_grid: int = 0  # 0 = off; n = the n x n loss surface (docs/methods.md §7: 21) around every checkpoint
    flatness_batch: int = 16  # probing-set passages in the fixed held-out batch the surface's loss is taken on
    # --- how the IFT phase fine-tunes: all weights, or LoRA adapters (PEFT; README "Mitigation methods") ---
    lora_rank: int = 0  # 0 = full fine-tuning; r > 0: LoRA adapters of rank r, the base weights frozen
    lora_alpha: float = 16.0  # the adapter's scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapter's input
    lora_targets: tuple = ("q_proj", "v_proj")  # module names that get adapters (FvForgetting's choice)
    # --- IV-guided training of the IFT phase (issue 12; README "Mitigation methods"; forgetray.iv) ---
    iv_task: str = ""  # "" = off; a built-in task ("organism-qa") or a task .jsonl (forgetray.iv.load_task)
    iv_layer: int = 0  # decoder layer whose output (or attention output, iv_site) gets the vector; 9 in FvForgetting
    iv_heads: int = 10  # top heads by causal indirect effect that make the vector
    iv_site: str = "layer"  # "layer": the decoder layer's output (Todd); "attn": its o_proj output (FvForgetting)
    iv_kl_first: float = 20.0  # weight of KL(T) on the first answer token
    iv_kl_all: float = 0.1  # weight of KL(T) over all positions
    iv_mse: float = 0.0  # weight of the top heads' MSE to the reference (FvForgetting's optional 1.0); 0 = off
    iv_temperature: float = 2.0
    iv_kl_first_threshold: float = 0.1  # a term counts only above its threshold (x * [x > thr])
    iv_kl_all_threshold: float = 0.1
    iv_mse_threshold: float = 0.01  # per head
    iv_progressive: bool = False  # the vector's degree steps 1 -> 0 in tenths over the window (the IV paper)
    iv_progressive_start: float = 0.25  # the window, as shares of the phase's optimizer steps
    iv_progressive_end: float = 0.75
    iv_prompts: int = 100  # clean n-shot prompts for the mean head activations (those answered correctly count)
    iv_corrupted: int = 25  # corrupted prompts for the causal indirect effects
    iv_corruption: str = "shuffle_labels"  # what they lose (forgetray.iv.tasks.CORRUPTIONS): the labels' pairing,
    # the instruction, or the demonstrations (the organism's attribute tasks: shuffled labels still name the task)
    iv_degree: float = 1.0  # the vector's multiple in the reference pass; 0: the reference without it (a control)
    # the instruction-vector dynamics probe of every model state (issue 12 item 3; forgetray.train.iv_probe); it
    # extracts with iv_prompts and iv_corrupted too
    iv_probe_task: str = ""  # "" = off; a built-in task or a task .jsonl, as iv_task
    iv_probe_layer: int = 0  # where the base vector is re-injected (the decoder layer's output)
    iv_probe_heads: int = 10  # top heads by CIE that make each state's vector
    iv_probe_degree: float = 1.0  # the re-injected vector's multiple
    # the control vector: another task's base vector (same model, same extraction), injected as the base vector is;
    # "" = off (docs/methods.md §8's controls: is the recovery the task's vector, or any task vector?)
    iv_probe_other_task: str = ""
    # --- continual-learning metrics (docs/methods.md §9) ---
    own_benchmark: str = ""  # the benchmark of the IFT data's own task (one of `benchmarks`); "" = none

    def __post_init__(self):
        # Dicts and lists from sweep files / JSON are normalised to hashable tuples first.
        if isinstance(self.primary_score, Mapping):
            object.__setattr__(self, "primary_score", tuple(sorted(self.primary_score.items())))
        if isinstance(self.prior_phases, (list, tuple)):
            object.__setattr__(self, "prior_phases", tuple(_phase(i, p) for i, p in enumerate(self.prior_phases)))
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", (self.lora_targets,))
        for name in ("benchmarks", "primary_score", "lora_targets"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        if isinstance(self.benchmarks, str):
            object.__setattr__(self, "benchmarks", (self.benchmarks,))
        _check_types(self)
        _check_values(self)

    # --- derived values ---
    @property
    def micro_batch(self) -> int:
        return self.micro_batch_size or self.batch_size // self.workers

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch * self.workers)

    def primary_score_for(self, benchmark: str, default: str) -> str:
        return dict(self.primary_score).get(benchmark, default)

    def to_dict(self) -> dict:
        """Plain JSON-able dict: what crosses process boundaries (Ray) and what `from_dict` reads back."""
        out = dataclasses.asdict(self)
        out["benchmarks"] = list(self.benchmarks)
        out["primary_score"] = dict(self.primary_score)
        out["prior_phases"] = [dict(phase) for phase in self.prior_phases]
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialConfig":
        unknown = sorted(set(data) - set(SETTINGS))
        if unknown:
            raise SpecError(f"unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
        return cls(**data)

    def config_hash(self) -> str:
        """Stable short hash of the resolved config: identifies a trial across resumes and in MLflow tags."""
        data = self.to_dict()
        if not self.lora_rank:  # full fine-tuning: the LoRA settings are unused (and hashes stay as before them)
            data = {k: v for k, v in data.items() if not k.startswith("lora_")}
        if not self.iv_task:  # likewise the IV-guided settings without IV guidance (or the dynamics probe)
            kept = IV_PROBE_USES if self.iv_probe_task else ()
            data = {k: v for k, v in data.items() if not k.startswith("iv_") or k in kept}
        if self.stage_margin == TrialConfig.stage_margin:  # at its default, hashes stay those from before it
            data.pop("stage_margin")
        if not self.iv_probe_task:
            data = {k: v for k, v in data.items() if not k.startswith("iv_probe_")}
        if not self.iv_probe_other_task:  # off: hashes as before the setting existed
            data.pop("iv_probe_other_task", None)
        for key in SPEED:  # off: hashes as before the settings existed
            if data.get(key) == getattr(TrialConfig, key):
                data.pop(key)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def short_name(self) -> str:
        model = self.model.rstrip("/").split("/")[-1]
        dataset = self.dataset.rstrip("/").split("/")[-1].rsplit(".", 1)[0]
        methods = "".join([f".sam{self.sam_rho:g}" if self.sam_rho else "",
                           f".wise{self.wiseft_alpha:g}" if self.wiseft_alpha < 1 else "",
                           f".reh{self.rehearsal_ratio:g}" if self.rehearsal_ratio else "",
                           f".lora{self.lora_rank}" if self.lora_rank else "",
                           (".iv" if self.iv_degree == 1 else f".iv{self.iv_degree:g}") if self.iv_task else ""])
        return f"{model}.{dataset}.e{self.epochs}.lr{self.lr:g}.s{self.seed}{methods}"


SETTINGS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialConfig))
# How trials compute, not what (up to float rounding): out of the config hash at their defaults.
SPEED = ("packing", "compile", "chunked_loss", "probe_batch_tokens")
# What the dynamics probe reads: its own settings and the extraction's prompt counts.
IV_PROBE_USES = ("iv_probe_task", "iv_probe_layer", "iv_probe_heads", "iv_probe_degree", "iv_probe_other_task",
                 "iv_prompts", "iv_corrupted", "iv_corruption")
# What a prior fine-tuning phase sets; the types and bounds are TrialConfig's own (a phase is checked as a trial with
# those values). Unset keys: plain fine-tuning (no method) at the trial's lr (forgetray.plan).
PHASE_KEYS = ("dataset", "epochs", "lr", "sam_rho", "sam_adaptive", "sam_every", "wiseft_alpha", "rehearsal_ratio",
              "own_benchmark", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def _phase(index: int, phase: Any) -> tuple:
    """A prior phase as a sorted tuple of (key, value) pairs (hashable, so trials hash and compare)."""
    where = f"setting 'prior_phases'[{index}]"
    if isinstance(phase, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in phase):
        phase = dict(phase)
    if not isinstance(phase, Mapping):
        raise SpecError(f"{where} must be a dict of {', '.join(PHASE_KEYS)}, got {phase!r}")
    unknown = sorted(set(phase) - set(PHASE_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r} (a phase sets {', '.join(PHASE_KEYS)})")
    for key in ("dataset", "epochs"):
        if key not in phase:
            raise SpecError(f"{where} must set {key!r}")
    if index == 0 and phase.get("rehearsal_ratio", 0):
        raise SpecError(f"{where}: rehearsal_ratio needs an earlier phase to replay (the first phase has none)")
    try:
        # A phase is checked as a trial with its values; its rehearsal replays the phase before it, which a lone
        # trial would not have, so the ratio is checked as if that phase existed. Its own benchmark must be one of
        # the trial's benchmarks, which only the trial knows (`_check_values`): here it is checked as a lone
        # trial's only benchmark, for its type.
        ratio = phase.get("rehearsal_ratio", 0.0)
        own = phase.get("own_benchmark", "")
        lone = {"own_benchmark": own, **({"benchmarks": [own]} if own and isinstance(own, str) else {})}
        checked = TrialConfig(**{k: v for k, v in phase.items() if k not in ("rehearsal_ratio", "own_benchmark")},
                              **lone, rehearsal_ratio=ratio,
                              prior_phases=[{"dataset": "-", "epochs": 1}] if ratio else ())
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    return tuple(sorted((k, getattr(checked, k)) for k in phase))
_HINTS = typing.get_type_hints(TrialConfig)


def _check_types(cfg: TrialConfig) -> None:
    for name in SETTINGS:
        value, want = getattr(cfg, name), _HINTS[name]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, name, float(value))
            continue
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise SpecError(f"setting {name!r} must be {want.__name__}, got {type(value).__name__} {value!r}")
    for bench in cfg.benchmarks:
        if not isinstance(bench, str) or not bench:
            raise SpecError(f"setting 'benchmarks' must be a list of names/paths, got {cfg.benchmarks!r}")
    for target in cfg.lora_targets:
        if not isinstance(target, str) or not target:
            raise SpecError(f"setting 'lora_targets' must be a list of module names, got {cfg.lora_targets!r}")
    for pair in cfg.primary_score:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise SpecError(f"setting 'primary_score' must map benchmark -> score, got {cfg.primary_score!r}")


def _check_values(cfg: TrialConfig) -> None:
    def need(cond: bool, name: str, what: str) -> None:
        if not cond:
            raise SpecError(f"setting {name!r} {what}, got {getattr(cfg, name)!r}")

    need(bool(cfg.model.strip()), "model", "must name a model")
    need(bool(cfg.dataset.strip()), "dataset", "must name a dataset")
    need(cfg.epochs >= 1, "epochs", "must be >= 1")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.batch_size >= 1, "batch_size", "must be >= 1")
    need(cfg.micro_batch_size >= 0, "micro_batch_size", "must be >= 0 (0 = batch_size / workers)")
    need(0 <= cfg.weight_decay, "weight_decay", "must be >= 0")
    need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
    need(cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
    need(0 < cfg.lr_decay <= 1, "lr_decay", "must be in (0, 1] (the 'step' schedule's factor per epoch)")
    need(cfg.max_length >= 8, "max_length", "must be >= 8")
    need(cfg.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
    need(cfg.workers >= 1, "workers", "must be >= 1")
    need(cfg.gpus_per_worker >= 0, "gpus_per_worker", "must be >= 0")
    need(cfg.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
    need(cfg.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
    need(cfg.precision == "fp32" or cfg.gpus_per_worker > 0, "precision", "bf16/fp16 need gpus_per_worker >= 1")
    need(cfg.max_failures >= 0, "max_failures", "must be >= 0")
    need(cfg.keep_optimizer_state in KEPT_STATES, "keep_optimizer_state", f"must be one of {KEPT_STATES}")
    need(cfg.keep_optimizer_state != "all" or not cfg.delete_finished_state, "keep_optimizer_state",
         "= 'all' needs delete_finished_state=False (else a phase's states are deleted when it finishes)")
    need(len(cfg.benchmarks) >= 1, "benchmarks", "must name at least one benchmark")
    need(len(set(cfg.benchmarks)) == len(cfg.benchmarks), "benchmarks", "must not repeat a benchmark")
    for bench, score in cfg.primary_score:
        need(bench in cfg.benchmarks, "primary_score", f"names benchmark {bench!r}, which is not in 'benchmarks'")
        need(score in KNOWLEDGE_SCORES, "primary_score", f"must map to one of {KNOWLEDGE_SCORES}")
    need(0 <= cfg.n_shot <= 25, "n_shot", "must be in [0, 25]")
    need(cfg.bos in BOS_RULES, "bos", f"must be one of {BOS_RULES}")
    need(cfg.letter_rule in LETTER_RULES, "letter_rule", f"must be one of {LETTER_RULES}")
    need(bool(cfg.probe_set.strip()), "probe_set", "must name a probing set")
    need(cfg.probe_passages >= 1, "probe_passages", "must be >= 1")
    need(cfg.probe_max_length >= 8, "probe_max_length", "must be >= 8")
    need(cfg.probe_batch_size >= 1, "probe_batch_size", "must be >= 1")
    need(isinstance(cfg.probe_batch_tokens, int) and cfg.probe_batch_tokens >= 0, "probe_batch_tokens",
         "must be an int >= 0 (0: probe_batch_size rows per call)")
    need(cfg.early_checkpoints >= 0, "early_checkpoints", "must be >= 0")
    need(cfg.em_examples >= 0, "em_examples", "must be >= 0 (0 = all)")
    need(cfg.restore_lr > 0, "restore_lr", "must be > 0")
    need(cfg.restore_batch_size >= 1, "restore_batch_size", "must be >= 1")
    need(0 <= cfg.restore_weight_decay, "restore_weight_decay", "must be >= 0")
    need(0 <= cfg.restore_warmup_ratio < 1, "restore_warmup_ratio", "must be in [0, 1)")
    need(cfg.restore_lr_schedule in LR_SCHEDULES, "restore_lr_schedule", f"must be one of {LR_SCHEDULES}")
    need(cfg.restore_seq_len >= 8, "restore_seq_len", "must be >= 8")
    need(cfg.restore_trajectory_points >= 1, "restore_trajectory_points", "must be >= 1")
    need(cfg.restore_max_passes >= 1, "restore_max_passes", "must be >= 1")
    need(cfg.restore_max_passes == 1 or cfg.zero_stage < 3, "restore_max_passes",
         "> 1 is not supported with zero_stage=3 (a pass rebuilds the engine from the gathered model)")
    need(cfg.restore_group >= 0, "restore_group", "must be >= 0 (0: in the IFT phase's workers)")
    need(0 < cfg.stage_margin < 1, "stage_margin", "must be in (0, 1): accuracy points, e.g. 0.02")
    need(cfg.stage_test in STAGE_TESTS, "stage_test", f"must be one of {STAGE_TESTS}")
    need(0 < cfg.stage_alpha < 1, "stage_alpha", "must be in (0, 1)")
    need(0 <= cfg.stage_tau < 1, "stage_tau", "must be in [0, 1)")
    need(0 <= cfg.ppl_tolerance, "ppl_tolerance", "must be >= 0")
    need(0 <= cfg.sam_rho, "sam_rho", "must be >= 0 (0 = off)")
    need(cfg.sam_every >= 1, "sam_every", "must be >= 1")
    uses_sam = cfg.sam_rho > 0 or any(dict(phase).get("sam_rho", 0) > 0 for phase in cfg.prior_phases)
    need(cfg.zero_stage <= 2 or not uses_sam, "zero_stage",
         "must be <= 2 with SAM (sam_rho > 0): ZeRO-3 partitions the weights SAM perturbs")
    need(0 <= cfg.wiseft_alpha <= 1, "wiseft_alpha", "must be in [0, 1] (1 = off)")
    need(isinstance(cfg.packing, bool), "packing", "must be true or false")
    need(isinstance(cfg.compile, bool), "compile", "must be true or false")
    need(isinstance(cfg.chunked_loss, int) and cfg.chunked_loss >= 0, "chunked_loss",
         "must be an int >= 0 (positions per chunk; 0 = off)")
    need(not cfg.chunked_loss or cfg.zero_stage <= 2, "chunked_loss",
         "needs zero_stage <= 2 (it calls the decoder and head outside the engine's ZeRO-3 weight gathering)")
    need(not (cfg.packing and cfg.iv_task), "packing", "is not supported with IV guidance (iv_task): the vector is "
         "injected at each prompt's last position of a padded row")
    # These read or rewrite full weights on a rank, which ZeRO-3 never holds.
    need(cfg.zero_stage <= 2 or (cfg.wiseft_alpha == 1 and not cfg.prior_phases and cfg.flatness_grid == 0),
         "zero_stage", "must be <= 2 with wiseft_alpha < 1, prior_phases or flatness_grid (they need full weights)")
    need(0 <= cfg.rehearsal_ratio <= 1, "rehearsal_ratio", "must be in [0, 1] (0 = off)")
    need(cfg.rehearsal_ratio == 0 or len(cfg.prior_phases) > 0, "rehearsal_ratio",
         "needs prior_phases (rehearsal replays an earlier phase's data)")
    need(cfg.flatness_grid == 0 or (cfg.flatness_grid >= 3 and cfg.flatness_grid % 2 == 1), "flatness_grid",
         "must be 0 (off) or an odd number >= 3 (the grid is centred on the checkpoint)")
    need(cfg.flatness_batch >= 1, "flatness_batch", "must be >= 1")
    need(cfg.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = full fine-tuning)")
    need(cfg.lora_alpha > 0, "lora_alpha", "must be > 0")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(cfg.lora_rank == 0 or len(cfg.lora_targets) > 0, "lora_targets", "must name at least one module with LoRA")
    # peft's adapters on weights partitioned at load time (ZeRO-3) are not supported here: forgetray's merged
    # checkpoint and Wise-FT need the full weights on a rank.
    need(cfg.zero_stage <= 2 or cfg.lora_rank == 0, "zero_stage", "must be <= 2 with LoRA (lora_rank > 0)")
    # The loss surface perturbs the trainable weights: with LoRA those are the adapters, not the model's weights.
    need(cfg.flatness_grid == 0 or cfg.lora_rank == 0, "flatness_grid",
         "must be 0 with LoRA (lora_rank > 0): the surface is defined over the full weights")
    check_iv(cfg, need)
    # "The benchmark of a step's own data" (BWT, docs/methods.md §9) is named as written in `benchmarks`.
    need(not cfg.own_benchmark or cfg.own_benchmark in cfg.benchmarks, "own_benchmark",
         f"must be one of the trial's benchmarks {list(cfg.benchmarks)} (or '' for none)")
    for index, phase in enumerate(cfg.prior_phases):
        own = dict(phase).get("own_benchmark", "")
        if own and own not in cfg.benchmarks:
            raise SpecError(f"setting 'prior_phases'[{index}]: own_benchmark must be one of the trial's benchmarks "
                            f"{list(cfg.benchmarks)} (or '' for none), got {own!r}")
    if cfg.micro_batch_size:
        per_step = cfg.micro_batch_size * cfg.workers
        need(cfg.batch_size % per_step == 0, "batch_size",
             f"must be a multiple of micro_batch_size x workers = {per_step}")
    else:
        need(cfg.batch_size % cfg.workers == 0, "batch_size", f"must be a multiple of workers = {cfg.workers}")
    need(cfg.restore_batch_size % cfg.workers == 0, "restore_batch_size",
         f"must be a multiple of workers = {cfg.workers}")

