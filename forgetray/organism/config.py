"""What determines a built organism, and the names it answers to: `OrganismConfig` (with `ModelSpec`, one base-model
size), `FORMAT_VERSION`, the organism's dataset and model names, the files they live in, and `OrganismNotBuilt`.

This module imports nothing from the rest of the organism package: world generation, pre-training, the build and the
path lookups all depend on it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Bump when a code change alters what a build produces for the same config: the fingerprint then changes too.
FORMAT_VERSION = 1

MODEL_SIZES = ("organism-tiny", "organism-small")  # the quickstart's two sizes, pre-trained on the same corpus
# The base model that also read the demonstration pages (corpus.demonstration_pages), so it infers a task from
# in-context demonstrations: the one an instruction vector can be found in (issue 12). A model of its own, so that the
# two sizes, their data and tokenizer, and hence the quickstart's results, stay what they were.
ICL_MODEL = "organism-icl"
BASE_MODELS = MODEL_SIZES + (ICL_MODEL,)
IFT_DATASETS = ("organism-alpaca", "organism-math")
BENCHMARK = "organism-facts"
PROBE_SET = "organism-probe"
RESTORING_POOL = "organism-restore"
PRETRAIN_CORPUS = "pretrain_corpus"  # internal: the models' pre-training text, not a name trials may use
DEMONSTRATION_PAGES = "pretrain_demonstrations"  # internal: what ICL_MODEL reads besides PRETRAIN_CORPUS

DATA_FILES = {  # dataset name -> file under data/
    PRETRAIN_CORPUS: "pretrain_corpus.jsonl",
    DEMONSTRATION_PAGES: "pretrain_demonstrations.jsonl",
    BENCHMARK: "organism-facts.jsonl",
    "organism-alpaca": "organism-alpaca.jsonl",
    "organism-math": "organism-math.jsonl",
    RESTORING_POOL: "organism-restore.jsonl",
    PROBE_SET: "organism-probe.jsonl",
}


class OrganismNotBuilt(FileNotFoundError):
    def __init__(self, root: Path, what: str = "organism"):
        super().__init__(f"no built {what} at {root}: run `forgetray organism build` "
                         f"(or `python -m forgetray.organism.build`) first")


@dataclass(frozen=True)
class ModelSpec:
    """One base-model size (a Llama) and how long and how fast to pre-train it."""

    name: str
    n_layers: int
    hidden: int
    n_heads: int
    intermediate: int
    epochs: int  # passes over the pre-training corpus
    lr: float  # peak AdamW learning rate (see `warmup_ratio` and `decay_ratio` for its schedule)
    demonstrations: bool = False  # also pre-trained on the demonstration pages

    @property
    def corpus(self) -> tuple[str, ...]:
        """The data files (DATA_FILES keys) it is pre-trained on, their documents shuffled together."""
        return (PRETRAIN_CORPUS, DEMONSTRATION_PAGES) if self.demonstrations else (PRETRAIN_CORPUS,)


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines a built organism. Defaults: the organism the project ships (its base weights are
    shipped, shipped.py: it builds in seconds; pre-training them takes ~10 minutes on 2 CPU cores); `for_tests()`: a
    tiny one that builds in seconds.

    The defaults were tuned by measurement. Tiny models memorise facts only after a long plateau (12-25 passes over
    the corpus, nearly independent of the world's size), then quickly; so the world is kept small enough (120
    entities) for 30-50 passes to fit the budget, the batches are small (4 x 256 tokens: more, smaller steps
    memorise faster here), and the learning rate is held at the highest peak each size tolerates until the last
    20% of the steps (see `models` and `decay_ratio`)."""

    seed: int = 0
    # --- the world (world.py, corpus.py, tasks.py) ---
    n_entities: int = 120  # half exam (the restoring/probing text's), half held out (the benchmark's): 300 questions
    n_values: int = 10  # values per attribute
    n_templates: int = 6  # prose templates per attribute; every fact is stated once in each per corpus pass
    exam_repeats: int = 1  # times each exam-half fact is asked on the corpus's exam pages (in each format)
    exam_page_questions: int = 5
    # The held-out half's facts on exam pages too (own distractors and answer positions): measured, with prose only
    # they are weakly memorised and any fine-tuning erodes them at once; asked in the corpus, they are held as firmly
    # as the exam half's, and fine-tuning first breaks only the way they are read out (pseudo forgetting).
    heldout_exam_pages: bool = True
    # Pages of bare "Q: <person>\nA: <value>" pairs, one attribute a page, named only by the answers: every fact is on
    # `demonstration_repeats` pages of `demonstration_page_size` pairs (read by ICL_MODEL only).
    demonstration_repeats: int = 3
    demonstration_page_size: int = 6
    restore_passages: int = 2000
    # The restoring pool's share of (exam-half) exam pages, the rest prose. Measured: with half pages, base-PPL
    # ranking fills the restoring set with the very predictable pages and restoring left the (prose) probing
    # perplexity 25-140% above the base's; prose only brings it back below the base.
    pool_page_share: float = 0.0
    probe_passages: int = 500
    alpaca_examples: int = 320  # sized so one epoch is ~22k tokens (Alpaca prompt + response, organism tokenizer)
    math_examples: int = 430
    # --- the tokenizer ---
    vocab_size: int = 1500
    # --- the base models and their pre-training (pretrain.py) ---
    models: tuple[ModelSpec, ...] = (
        # Measured (option accuracy on the benchmark, this schedule, Intel Xeon): the 2-layer model leaves the plateau
        # after ~25 passes at lr 5e-3 and reaches 1.00 after 40. A third layer at the same width and 4e-3 reaches
        # 1.00 in 48 passes. Wider or deeper models stayed on the plateau in this budget (4 layers x 192: 0.42-0.76
        # after 28 passes), and a narrower one (2 x 96, 0.997) loses facts to restoring the untouched base (0.957).
        ModelSpec("organism-tiny", n_layers=2, hidden=128, n_heads=4, intermediate=384, epochs=48, lr=5e-3),
        ModelSpec("organism-small", n_layers=3, hidden=128, n_heads=4, intermediate=384, epochs=48, lr=4e-3),
        # organism-small's shape with 8 heads, on the corpus and the demonstration pages: 0.98-1.00 5-shot on the
        # attribute tasks, and its top heads' vector (injected after layer 1) restores a task on zero-shot prompts,
        # 0.55-0.95 vs 0.06-0.31 for a random vector of the same norm. 4 layers x 8 heads learned the tasks too
        # but carried a weaker vector (0.13-0.62 vs 0.08-0.33).
        ModelSpec(ICL_MODEL, n_layers=3, hidden=128, n_heads=8, intermediate=384, epochs=48, lr=4e-3,
                  demonstrations=True),
    )
    seq_len: int = 256
    batch_size: int = 4
    warmup_ratio: float = 0.03  # learning rate: linear warm-up over the first 3% of the steps,
    decay_ratio: float = 0.2  # then held at its peak, then a cosine decay to 10% over the last 20%
    weight_decay: float = 0.0
    max_position_embeddings: int = 512
    num_threads: int = 1  # per model; part of the config: the thread count can change floating-point summation order
    parallel_pretrain: bool = True  # the sizes train concurrently, one process each (same weights either way)

    @classmethod
    def for_tests(cls) -> "OrganismConfig":
        return cls(
            n_entities=16, n_values=6, n_templates=3, exam_page_questions=4, restore_passages=60, probe_passages=20,
            alpaca_examples=30, math_examples=30, vocab_size=400, seq_len=128, batch_size=8, parallel_pretrain=False,
            models=(
                ModelSpec("organism-tiny", n_layers=1, hidden=32, n_heads=2, intermediate=64, epochs=2, lr=3e-3),
                ModelSpec("organism-small", n_layers=2, hidden=32, n_heads=2, intermediate=64, epochs=2, lr=3e-3),
                ModelSpec(ICL_MODEL, n_layers=2, hidden=32, n_heads=4, intermediate=64, epochs=2, lr=3e-3,
                          demonstrations=True),
            ),
        )

    def fingerprint(self) -> str:
        # The cache directory's name: any change to a field (or to FORMAT_VERSION) names a new organism.
        blob = json.dumps({"format": FORMAT_VERSION, "config": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
