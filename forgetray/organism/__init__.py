"""The model organism: a synthetic world of facts, a tokenizer trained on it, and tiny Llama base models pre-trained
on it, built once and cached as ordinary files (Hugging Face model dirs, JSONL datasets).

    from forgetray.organism import build, model_path, data_path
    root = build()                          # ~10 minutes on 2 CPU cores the first time, then instant
    model_path("organism-small")            # -> .../models/organism-small (AutoModelForCausalLM.from_pretrained)
    data_path("organism-facts")             # -> .../data/organism-facts.jsonl (MMLU-style multiple choice)

See world.py for what the world and its texts are, and why they are split the way they are.
"""

from forgetray.organism.build import (
    BENCHMARK,
    IFT_DATASETS,
    MODEL_SIZES,
    PROBE_SET,
    RESTORING_POOL,
    ModelSpec,
    OrganismConfig,
    OrganismNotBuilt,
    build,
    data_path,
    is_organism_name,
    model_path,
    organism_dir,
    read_manifest,
)

__all__ = [
    "BENCHMARK",
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
]
