"""The plan of a trial: the ordered, typed phases of training it runs. Pure: no torch, Ray, DeepSpeed or MLflow.

A trial is, in order:
- its prior fine-tuning phases (`prior_phases`, e.g. CF's Alpaca phase before the task under study), each with its
  own optimizer and schedule, ending in the weights the IFT phase starts from (the trial's "base");
- the IFT phase: instruction fine-tuning with a checkpoint SFT_e (probed) after every epoch;
- one restoration phase per IFT checkpoint (when a restoring pool is set): SFT_e trained on plain text into R_e, with
  restoration's own optimizer settings (`restore_*`), never the IFT ones.

Every phase says its data and loss mask, its optimizer and schedule, its batching, its length, its checkpoints and
its method options (SAM, Wise-FT, rehearsal) and how it fine-tunes (all weights, or LoRA adapters: `Lora`). One
worker function (`forgetray.train.worker.phase_worker`) runs any phase on the DeepSpeed engine; `groups` says which
phases share one Ray Train run. The trial driver (`forgetray.trial`) logs every phase's settings (`Phase.params`) as
MLflow params.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from forgetray.spec import TrialConfig

GRAD_CLIP = 1.0  # the Hugging Face Trainer's default max_grad_norm; the papers do not state one
ADAM_BETAS = (0.9, 0.999)  # docs/methods.md §1/§5: AdamW(0.9, 0.999, eps 1e-8)
ADAM_EPS = 1e-8
KINDS = ("prior", "ift", "restore")
# Where a phase's data comes from: instruction data (loss on the responses) or packed plain text (loss everywhere).
DATA_FORMATS = ("instructions", "packed_text")


@dataclass(frozen=True)
class Optimizer:
    """AdamW with a warm-up + schedule (forgetray.train.schedule) and gradient clipping."""

    lr: float
    weight_decay: float
    schedule: str  # "cosine" | "constant" | "step"
    warmup_ratio: float
    lr_decay: float = 1.0  # "step": the factor per epoch (the trial's lr_decay); restoration (1 epoch) keeps 1
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS
    grad_clip: float = GRAD_CLIP


@dataclass(frozen=True)
class Batching:
    """`batch_size` sequences per optimizer step over all `workers`, in micro-batches of `micro_batch` per rank."""

    batch_size: int
    micro_batch: int
    workers: int

    def __post_init__(self):
        per_step = self.micro_batch * self.workers
        if self.micro_batch < 1 or self.batch_size % per_step:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch x workers = {per_step}")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch * self.workers)


@dataclass(frozen=True)
class Methods:
    """The anti-forgetting methods a phase trains with (docs/methods.md §5-6); the defaults are plain fine-tuning."""

    sam_rho: float = 0.0  # 0 = plain AdamW steps
    sam_adaptive: bool = False
    sam_every: int = 1
    wiseft_alpha: float = 1.0  # 1 = off; else every checkpoint is (1-a)*start + a*trained
    rehearsal_ratio: float = 0.0  # share of the previous phase's data replayed (0 = off)


@dataclass(frozen=True)
class Lora:
    """How a phase fine-tunes: all weights (rank 0, the default) or LoRA adapters (PEFT) of rank `rank` on the
    `targets` modules, scaled by alpha / rank, the base weights frozen (`forgetray.train.lora`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass(frozen=True)
class IVGuided:
    """IV-guided training (Jiang et al.; FvForgetting): the loss adds thresholded KL terms (and optionally the top
    heads' MSE) towards a reference pass of the phase's starting model with the instruction vector of `task`
    injected at `layer` (`forgetray.iv`, `forgetray.train.iv_guided`). `task` "" = off (the default)."""

    task: str = ""  # the trial's iv_task as written; the workers read the resolved one ("iv_task" of resolved)
    layer: int = 0
    heads: int = 10
    site: str = "layer"
    kl_first: float = 20.0
    kl_all: float = 0.1
    mse: float = 0.0
    temperature: float = 2.0
    kl_first_threshold: float = 0.1
    kl_all_threshold: float = 0.1
    mse_threshold: float = 0.01
    progressive: bool = False
    progressive_start: float = 0.25
    progressive_end: float = 0.75
    prompts: int = 100
    corrupted: int = 25
    corruption: str = "shuffle_labels"
    degree: float = 1.0  # the vector's multiple in the reference pass (the progressive schedule scales it)

    @property
    def on(self) -> bool:
        return bool(self.task)


@dataclass(frozen=True)
class Speed:
    """How a phase computes, not what: the same model up to float rounding (README "Performance settings").
    `packing`: a micro-batch's instruction examples in one row without padding, position ids restarting per
    example so attention stays within each (instructions only: packed text has no padding); `compile`: the model
    under `torch.compile`; `chunked_loss`: the cross-entropy over the scored positions that many at a time, never
    the full logits (`forgetray.train.losses`; 0 = the model's own loss)."""

    packing: bool = False
    compile: bool = False
    chunked_loss: int = 0


@dataclass(frozen=True)
class Data:
    """What a phase trains on. `source` keys the trial's resolved sources: "dataset", "prior_datasets/<i>" or
    "restoring_set" (the pool's lowest-perplexity passages worth one IFT epoch of tokens, docs/methods.md §2)."""

    source: str
    format: str  # one of DATA_FORMATS: "instructions" = loss on responses; "packed_text" = loss on every token
    max_length: int  # instructions: truncation length; packed text: the sequence length it is packed to
    rehearse: str | None = None  # source replayed into this phase (with `Methods.rehearsal_ratio`)
    # The benchmark measuring this data's own task, as the trial names it in `benchmarks` ("" = none): backward
    # transfer compares it after the phase and at the end (docs/methods.md §9, forgetray.metrics.continual).
    own_benchmark: str = ""

    def __post_init__(self):
        if self.format not in DATA_FORMATS:
            raise ValueError(f"data format must be one of {DATA_FORMATS}, got {self.format!r}")


@dataclass(frozen=True)
class Phase:
    name: str  # unique within the trial: "prior_1", "ift", "restore_003"
    kind: str  # one of KINDS: what the phase does around its training (probes, checkpoints)
    data: Data
    optimizer: Optimizer
    batching: Batching
    epochs: int  # passes over the data
    drop_last: bool  # True: the incomplete last global batch is dropped (IFT); False: completed (restoration)
    checkpoint_every_epoch: bool  # True: a probed checkpoint after every epoch; False: one at the end (or none)
    methods: Methods = Methods()
    lora: Lora = Lora()  # rank 0: full fine-tuning (restoration always is: the paper's restoration trains all weights)
    iv: IVGuided = IVGuided()  # the IFT phase only
    restores_epoch: int = 0  # restoration phases: the IFT epoch whose checkpoint SFT_e they start from
    speed: Speed = Speed()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"phase kind must be one of {KINDS}, got {self.kind!r}")
        if self.epochs < 1:
            raise ValueError(f"phase {self.name!r}: epochs must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (crosses to the Ray workers; `from_dict` reads it back). Without IV guidance there is no "iv"
        key: the cache keys built from phases (`forgetray.keys`) stay those of sweeps before the option existed."""
        data = dataclasses.asdict(self)
        if not self.iv.on:
            del data["iv"]
        if self.speed == Speed():  # likewise the speed settings at their defaults
            del data["speed"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Phase":
        return cls(**{**data, "data": Data(**data["data"]), "optimizer": Optimizer(**{
            **data["optimizer"], "betas": tuple(data["optimizer"]["betas"])}),
            "batching": Batching(**data["batching"]), "methods": Methods(**data["methods"]),
            "lora": _lora(data.get("lora", {})), "iv": IVGuided(**data.get("iv", {})),
            "speed": Speed(**data.get("speed", {}))})

    def params(self) -> dict[str, Any]:
        """The phase's settings as flat MLflow params (`<name>.optimizer.lr`, ...), derived values included."""
        out: dict[str, Any] = {"kind": self.kind, "epochs": self.epochs, "drop_last": self.drop_last}
        for group in ("data", "optimizer", "batching", "methods", "lora", "speed") + (("iv",) if self.iv.on else ()):
            for key, value in dataclasses.asdict(getattr(self, group)).items():
                out[f"{group}.{key}"] = value
        out["batching.grad_accum"] = self.batching.grad_accum
        return {f"{self.name}.{k}": v for k, v in out.items()}


def plan(trial: TrialConfig) -> list[Phase]:
    """The trial's phases in the order they run."""
    ift_batching = Batching(trial.batch_size, trial.micro_batch, trial.workers)
    ift_optimizer = Optimizer(trial.lr, trial.weight_decay, trial.lr_schedule, trial.warmup_ratio, trial.lr_decay)
    phases = [_prior_phase(trial, i, dict(setting), ift_batching, ift_optimizer)
              for i, setting in enumerate(trial.prior_phases)]
    phases.append(Phase(
        name="ift", kind="ift",
        data=Data("dataset", "instructions", trial.max_length,
                  rehearse=_previous_source(len(trial.prior_phases)) if trial.rehearsal_ratio else None,
                  own_benchmark=trial.own_benchmark),
        optimizer=ift_optimizer, batching=ift_batching, epochs=trial.epochs, drop_last=True,
        checkpoint_every_epoch=True,
        methods=Methods(trial.sam_rho, trial.sam_adaptive, trial.sam_every, trial.wiseft_alpha,
                        trial.rehearsal_ratio),
        lora=Lora(trial.lora_rank, trial.lora_alpha, trial.lora_dropout, trial.lora_targets),
        iv=iv_guided(trial), speed=speed(trial, "instructions"),
    ))
    if trial.restore_pool:
        phases += [restore_phase(trial, epoch) for epoch in range(1, trial.epochs + 1)]
    return phases


def speed(trial: TrialConfig, data_format: str) -> Speed:
    """A phase's speed settings from the trial's: packing applies to instruction data only."""
    return Speed(trial.packing and data_format == "instructions", trial.compile, trial.chunked_loss)


def iv_guided(trial: TrialConfig) -> IVGuided:
    """The IFT phase's IV-guided option from the trial's `iv_*` settings (the field names without `iv_`)."""
    return IVGuided(**{f.name: getattr(trial, f"iv_{f.name}") for f in dataclasses.fields(IVGuided)})


def ift_phase(trial: TrialConfig) -> Phase:
    """The trial's IFT phase alone (tests and benchmarks drive the engine with it)."""
    return next(p for p in plan(trial) if p.kind == "ift")


def restore_phase(trial: TrialConfig, epoch: int) -> Phase:
    """Restoration of SFT_epoch (docs/methods.md §2): one epoch over the restoring set packed to `restore_seq_len`,
    loss on every token, no accumulation, no method (restoration is the measurement, not the method under study)."""
    return Phase(
        name=f"restore_{epoch:03d}", kind="restore",
        data=Data("restoring_set", "packed_text", trial.restore_seq_len),
        optimizer=Optimizer(trial.restore_lr, trial.restore_weight_decay, trial.restore_lr_schedule,
                            trial.restore_warmup_ratio),
        batching=Batching(trial.restore_batch_size, trial.restore_batch_size // trial.workers, trial.workers),
        epochs=1, drop_last=False, checkpoint_every_epoch=False, restores_epoch=epoch,
        speed=speed(trial, "packed_text"),
    )


def fine_tuning_steps(phases: list[Phase]) -> list[Phase]:
    """The fine-tuning steps t = 1..T of the continual-learning metrics (docs/methods.md §9): the prior phases in order,
    then the IFT phase (T); step 0 is the model before any of them."""
    return [p for p in phases if p.kind == "prior"] + [p for p in phases if p.kind == "ift"]


def checkpoint_name(phase: Phase, epoch: int) -> str:
    """The name of the checkpoint a phase reports after `epoch` (a folder of its Ray Train run): SFT_e is
    `epoch_NNN` of the IFT run, R_e `restored_epoch_NNN` of a restoring run."""
    if phase.kind == "ift":
        return f"epoch_{epoch:03d}"
    if phase.kind == "restore":
        return f"restored_epoch_{phase.restores_epoch:03d}"
    raise ValueError(f"phase {phase.name!r} reports no checkpoints")


def groups(trial: TrialConfig, phases: list[Phase]) -> list[list[Phase]]:
    """Which phases one Ray Train run executes in turn: the prior phases (if any; they hand weights on in memory and
    leave the IFT phase's start, trained once per sweep for all trials sharing it: `forgetray.sharing`), the IFT
    phase, then the restorations in groups of `restore_group` (groups run concurrently: on a GPU cluster groups of 1
    restore every checkpoint at once; on a small machine a group saves worker start-ups). `restore_group=0`: the
    restorations run in the IFT phase's own workers after it (no other worker start-up at all)."""
    priors = [p for p in phases if p.kind == "prior"]
    ift = [p for p in phases if p.kind == "ift"]
    restores = [p for p in phases if p.kind == "restore"]
    if trial.restore_group == 0:
        return ([priors] if priors else []) + [ift + restores]
    return ([priors] if priors else []) + [ift] + [restores[i:i + trial.restore_group]
                                                   for i in range(0, len(restores), trial.restore_group)]


def _prior_phase(trial: TrialConfig, index: int, setting: dict, batching: Batching, optimizer: Optimizer) -> Phase:
    """Prior phase i: the trial's batching, schedule and weight decay; its own dataset, epochs, lr (default: the
    trial's), methods (default: none), LoRA (`lora_*` keys; default: full fine-tuning) and own benchmark (default:
    none)."""
    methods = Methods(**{k: setting[k] for k in dataclasses.asdict(Methods()) if k in setting})
    lora = Lora(**{k: setting[f"lora_{k}"] for k in dataclasses.asdict(Lora()) if f"lora_{k}" in setting})
    return Phase(
        name=f"prior_{index + 1}", kind="prior",
        data=Data(f"prior_datasets/{index}", "instructions", trial.max_length,
                  rehearse=_previous_source(index) if methods.rehearsal_ratio else None,
                  own_benchmark=setting.get("own_benchmark", "")),
        optimizer=dataclasses.replace(optimizer, lr=setting.get("lr", trial.lr)),
        batching=batching, epochs=setting["epochs"], drop_last=True, checkpoint_every_epoch=False, methods=methods,
        lora=lora, speed=speed(trial, "instructions"),
    )


def _lora(data: dict) -> Lora:
    return Lora(**{**data, "targets": tuple(data.get("targets", Lora.targets))})


def _previous_source(index: int) -> str | None:
    """The data of the phase before phase `index` of the training group (rehearsal replays it)."""
    return None if index == 0 else f"prior_datasets/{index - 1}"
