"""Where a built organism and its files are: the cache directory, the manifest, a model's or dataset's path, and
`resolve_name`, the one lookup of an organism name a trial setting uses.

Cheap (file checks only, no torch; a derived restoring pool is a filter of a 2,000-line file): the trial resolver
calls these before any compute starts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from forgetray.organism.config import (
    BENCHMARK,
    DATA_FILES,
    IFT_DATASETS,
    BASE_MODELS,
    PROBE_SET,
    RESTORING_POOL,
    OrganismConfig,
    OrganismNotBuilt,
)
from forgetray.organism.pools import WITHOUT_ATTRIBUTE

# What an organism name can stand for in a trial: kind -> (what it is called in messages, the names of that kind).
NAME_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("model", BASE_MODELS),
    "dataset": ("dataset", IFT_DATASETS),
    "benchmark": ("benchmark", (BENCHMARK,)),
    "probe_set": ("probing set", (PROBE_SET,)),
    # and the pool's variants that never state one attribute (pools.py), derived from it when named
    "restore_pool": ("restoring pool", (RESTORING_POOL, *WITHOUT_ATTRIBUTE)),
}


def is_organism_name(s: str) -> bool:
    """Names starting with "organism-" are reserved for the organism (a typo gets a clear error, not a hub lookup)."""
    return isinstance(s, str) and s.startswith("organism-")


def organism_dir(config: OrganismConfig | None = None) -> Path:
    """Where the organism for `config` lives. Without a config: $FORGETRAY_ORGANISM if set (a built organism dir),
    else the default config's directory under $FORGETRAY_HOME (default ~/.cache/forgetray)."""
    if config is None and os.environ.get("FORGETRAY_ORGANISM"):
        return Path(os.environ["FORGETRAY_ORGANISM"]).expanduser()
    home = Path(os.environ.get("FORGETRAY_HOME") or Path.home() / ".cache" / "forgetray").expanduser()
    return home / "organism" / (config or OrganismConfig()).fingerprint()


def read_manifest(root: Path | None = None) -> dict:
    root = Path(root) if root is not None else organism_dir()
    path = root / "manifest.json"
    if not path.is_file():
        raise OrganismNotBuilt(root)
    return json.loads(path.read_text())


def model_path(name: str, root: Path | None = None) -> Path:
    root = Path(root) if root is not None else organism_dir()
    manifest = read_manifest(root)
    if name not in manifest["models"]:
        raise ValueError(f"{name!r} is not an organism model (this organism has: {', '.join(manifest['models'])})")
    path = root / "models" / name
    if not (path / "config.json").is_file():
        raise OrganismNotBuilt(path, f"model {name!r}")
    return path


def data_path(name: str, root: Path | None = None) -> Path:
    if name not in DATA_FILES:
        raise ValueError(f"{name!r} is not an organism dataset (known: {', '.join(DATA_FILES)})")
    root = Path(root) if root is not None else organism_dir()
    read_manifest(root)  # a data file without a manifest is a leftover, not a built organism
    path = root / "data" / DATA_FILES[name]
    if not path.is_file():
        raise OrganismNotBuilt(path, f"dataset {name!r}")
    return path


def resolve_name(name: str, kind: str, root: Path | None = None) -> Path:
    """The built file (or model directory) of organism name `name` used as a `kind` (a key of NAME_KINDS: "model",
    "dataset", "benchmark", "probe_set", "restore_pool"). Raises ValueError, its message fit to follow "setting
    'x': ", listing the known names if `name` is not one of that kind, or saying to run `forgetray organism build`
    if the organism or that file is not built."""
    if kind not in NAME_KINDS:
        raise ValueError(f"resolve_name: kind must be one of {', '.join(NAME_KINDS)}, got {kind!r}")
    noun, known = NAME_KINDS[kind]
    if name not in known:
        raise ValueError(f"{name!r} is not an organism {noun} (known: {', '.join(known)})")
    try:
        if name in WITHOUT_ATTRIBUTE:
            from forgetray.organism.pools import write_derived

            root = Path(root) if root is not None else organism_dir()
            return write_derived(name, root, data_path(RESTORING_POOL, root), read_manifest(root)["config"])
        return model_path(name, root) if kind == "model" else data_path(name, root)
    except OrganismNotBuilt as exc:
        raise ValueError(str(exc)) from None
