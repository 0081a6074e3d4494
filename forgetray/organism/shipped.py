"""Base weights shipped with forgetray, so that every machine starts from the same organism.

Pre-training is deterministic on one machine but not across CPUs: AVX-512 and AVX2 kernels round differently, and
over 3000 steps the last bits grow into another model (the same config built on an AMD EPYC and on an Intel Xeon gave
base probing PPL 4.04 and 4.43, and different quickstart tables). The data and the tokenizer are made by pure Python
and are the same everywhere; only the weights differ. So the project ships the weights it measured (a few MB) and a
build installs them, after checking that its own data and tokenizer are byte for byte those the weights were trained
on. What still differs across CPUs is fine-tuning's last bits, which the quickstart's replicates (seeds) cover.

    forgetray/organism/weights/<fingerprint>/
        shipped.json                   what made them: the sha256 of every data and tokenizer file of that build, per
                                       size the sha256 of its weights and of its weights after the first CHECK_STEPS
                                       steps of pre-training, and the machine (CPU, torch's kernel level, versions)
        <size>/config.json, <size>/model.safetensors

`forgetray organism build --pretrain` ignores them and pre-trains; `forgetray organism verify [--full]` pre-trains
again and compares bit for bit (the first CHECK_STEPS steps, or all); `forgetray organism ship` (maintainers) copies a
pre-trained build here.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import Callable, Mapping

from forgetray.organism.config import OrganismConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
CHECK_STEPS = 50  # pre-training steps the quick check repeats (seconds on a CPU)
MODEL_FILES = ("config.json", "model.safetensors")


def shipped_dir(config: OrganismConfig) -> Path | None:
    """The shipped weights for `config`, or None when the project ships none for it (e.g. the tests' organism)."""
    folder = WEIGHTS_DIR / config.fingerprint()
    return folder if (folder / "shipped.json").is_file() else None


def read_shipped(folder: Path) -> dict:
    return json.loads((folder / "shipped.json").read_text())


def cpu_signature() -> dict:
    """What decides floating-point results on this machine: the CPU, the kernel level torch dispatches to, versions."""
    import torch

    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def same_machine_kind(a: Mapping, b: Mapping) -> bool:
    return all(a.get(k) == b.get(k) for k in ("cpu", "kernels", "torch"))


def input_mismatches(shipped: Mapping, built_files: Mapping[str, Mapping]) -> list[str]:
    """The data and tokenizer files whose content differs from those the shipped weights were trained on."""
    wanted = shipped["inputs"]
    return sorted(name for name in set(wanted) | {n for n in built_files if _is_input(n)}
                  if wanted.get(name) != built_files.get(name, {}).get("sha256"))


def _is_input(name: str) -> bool:
    return name.startswith("data/") or name.startswith("tokenizer/")


def weights_digest(state_dict: Mapping) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: equal iff bit for bit equal."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def install(folder: Path, models_dir: Path, names) -> None:
    """Copy the shipped model files of `names` into a build's models/ (the tokenizer is added by the caller)."""
    for name in names:
        (models_dir / name).mkdir(parents=True, exist_ok=True)
        for file in MODEL_FILES:
            shutil.copyfile(folder / name / file, models_dir / name / file)


def check_digests(config: OrganismConfig, root: Path, steps: int | None,
                  progress: Callable[[str], None] = print) -> dict[str, str]:
    """Pre-train every size of `config` again on the data and tokenizer at `root` (a built organism), for `steps`
    steps (None: the whole run), and return each size's weights digest."""
    from transformers import PreTrainedTokenizerFast

    from forgetray.organism.config import DATA_FILES
    from forgetray.organism.pretrain import pretrain, read_corpus, settings_of

    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / "tokenizer")
    digests = {}
    for spec in config.models:
        texts = read_corpus([root / "data" / DATA_FILES[name] for name in spec.corpus])
        result = pretrain(spec, settings_of(config), tokenizer, texts, progress, max_steps=steps)
        digests[spec.name] = weights_digest(result.model.state_dict())
    return digests


def ship(config: OrganismConfig, root: Path, progress: Callable[[str], None] = print) -> Path:
    """Copy the pre-trained models of the built organism at `root` into WEIGHTS_DIR (maintainers, after a change to
    the default config): its weights, their digests, the quick-check digests and this machine's description."""
    from transformers import AutoModelForCausalLM

    from forgetray.organism.paths import read_manifest

    manifest = read_manifest(root)
    if manifest["fingerprint"] != config.fingerprint():
        raise ValueError(f"{root} holds organism {manifest['fingerprint']}, not {config.fingerprint()}")
    if manifest.get("weights", {}).get("source") != "pretrained":
        raise ValueError(f"{root}'s weights were not pre-trained there (build it with --pretrain first)")
    folder = WEIGHTS_DIR / config.fingerprint()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    install(root / "models", tmp, [spec.name for spec in config.models])
    sizes = {}
    quick = check_digests(config, root, CHECK_STEPS, progress)
    for spec in config.models:
        model = AutoModelForCausalLM.from_pretrained(root / "models" / spec.name)
        sizes[spec.name] = {"weights": weights_digest(model.state_dict()), f"after_{CHECK_STEPS}_steps": quick[spec.name],
                            **manifest["models"][spec.name]}
    shipped = {
        "fingerprint": config.fingerprint(),
        "inputs": {name: info["sha256"] for name, info in manifest["files"].items() if _is_input(name)},
        "models": sizes,
        "check_steps": CHECK_STEPS,
        "made_on": {**cpu_signature(), "build_date": manifest["build_date"]},
    }
    (tmp / "shipped.json").write_text(json.dumps(shipped, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def verify(config: OrganismConfig, root: Path, full: bool, progress: Callable[[str], None] = print) -> dict:
    """Pre-train again on this machine and compare with the shipped weights: {size: (expected, found)}."""
    folder = shipped_dir(config)
    if folder is None:
        raise FileNotFoundError(f"no shipped weights for organism {config.fingerprint()} in {WEIGHTS_DIR}")
    shipped = read_shipped(folder)
    key = "weights" if full else f"after_{shipped['check_steps']}_steps"
    found = check_digests(config, root, None if full else shipped["check_steps"], progress)
    return {name: (shipped["models"][name][key], found[name]) for name in found}
