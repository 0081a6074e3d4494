"""The model organism: a synthetic world of facts, a tokenizer trained on it, and tiny Llama base models pre-trained
on it, built once and cached as ordinary files (Hugging Face model dirs, JSONL datasets).

    from forgetray.organism import build, model_path, data_path
    root = build()                          # seconds (installs the shipped weights) the first time, then instant
    model_path("organism-small")            # -> .../models/organism-small (AutoModelForCausalLM.from_pretrained)
    # base models: organism-tiny and organism-small (the quickstart's sizes), organism-icl (also read the
    # demonstration pages: it infers a task from in-context demonstrations, the instruction-vector studies' model)
    data_path("organism-facts")             # -> .../data/organism-facts.jsonl (MMLU-style multiple choice)

Layout, each module depending only on those above it: `config` (OrganismConfig, its fingerprint, the organism's names
and files; imports nothing of the package), `world` (the invented people and their facts), `corpus` (every text about
them: pre-training prose and exam pages, the demonstration pages, the benchmark, the probing set and restoring pool),
`tasks` (the instruction-tuning sets, which never name a person), `tokenizer`, `pretrain` (deterministic pre-training
of the base models), `pools` (restoring pools derived from the built one at run time, e.g. one that never states a
colour), `paths` (where a built organism's files are; cheap) and `build` (writes the data files, trains
the tokenizer and the models, scores them, writes the manifest).
"""

from forgetray.organism.build import build
from forgetray.organism.config import (
    BASE_MODELS,
    BENCHMARK,
    ICL_MODEL,
    IFT_DATASETS,
    MODEL_SIZES,
    PROBE_SET,
    RESTORING_POOL,
    ModelSpec,
    OrganismConfig,
    OrganismNotBuilt,
)
from forgetray.organism.paths import (
    data_path,
    is_organism_name,
    model_path,
    organism_dir,
    read_manifest,
    resolve_name,
)

__all__ = [
    "BASE_MODELS",
    "BENCHMARK",
    "ICL_MODEL",
    "IFT_DATASETS",
    "MODEL_SIZES",
    "PROBE_SET",
    "RESTORING_POOL",
    "ModelSpec",
    "OrganismConfig",
    "OrganismNotBuilt",
    "build",
    "data_path",
    "is_organism_name",
    "model_path",
    "organism_dir",
    "read_manifest",
    "resolve_name",
]
