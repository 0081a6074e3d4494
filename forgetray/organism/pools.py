"""Restoring pools derived at run time from the built pool (issue 17 item 4; docs/methods.md §8, control 2).

`organism-restore-no-<attribute>` (e.g. `organism-restore-no-colour`) is `organism-restore` with every statement of
that attribute taken out: each prose passage loses the sentences that state it (the passage's other sentences stay,
in order), an exam page about it is dropped whole (pages are about one subject; the default pool has none). An IV
study whose task asks that attribute (`organism-colour`) restores on it, so that R_e's recovery of the task cannot be
the pool teaching the very facts the task asks again.

Why sentences and not whole passages: a passage states 2-4 of the 5 attributes, so dropping every passage that
states a colour leaves 809 of the 2,000 passages, 19,430 tokens (measured on the default organism), fewer than the
restoring budget of one organism-alpaca epoch (21,245 tokens): the restoration would refuse the pool. Taking the
sentences out keeps ~42k tokens and the same kind of prose.

Derived, never built: the organism's generated files (data/, tokenizer/) are byte for byte those the shipped base
weights were trained on (shipped.py checks it), so a variant is written beside them, under `<root>/derived/`, from
the built pool when a trial names it, and rewritten whenever its content would differ. Imports only `config` and
`world` of the package, so `paths` can name the variants.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from forgetray.organism.config import RESTORING_POOL
from forgetray.organism.world import ATTRIBUTES, World, make_world

DERIVED_DIR = "derived"  # beside data/, never one of the files the shipped weights' inputs are checked against
# variant name -> the attribute it never states
WITHOUT_ATTRIBUTE: dict[str, str] = {f"{RESTORING_POOL}-no-{a.key}": a.key for a in ATTRIBUTES}
# Every prose template ends a sentence with "." (the question templates' "?" is followed by "The answer is v."
# inside the same template), so a sentence ends at ". ".
_SENTENCE_END = re.compile(r"(?<=\.) +")


def mentions(world: World, key: str) -> re.Pattern:
    """Matches a mention of any value of attribute `key` as a whole word (every statement of the attribute names
    its value; world.py keeps invented names and values apart, so no other text matches)."""
    values = sorted(world.values[key], key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(v) for v in values) + r")\b", re.IGNORECASE)


def without_attribute(records: Iterable[Mapping], world: World, key: str) -> list[dict]:
    """The pool's records with every statement of attribute `key` taken out (see the module's docstring); a record
    left with no text is dropped, the others keep their id."""
    said = mentions(world, key)
    out = []
    for record in records:
        text = record["text"]
        if "\n" in text:  # an exam page: one subject, kept or dropped whole
            kept = "" if said.search(text) else text
        else:
            kept = " ".join(s for s in _SENTENCE_END.split(text) if not said.search(s))
        if kept:
            out.append({**record, "text": kept})
    return out


def write_derived(name: str, root: Path, source: Path, config: Mapping) -> Path:
    """The variant `name` (a key of WITHOUT_ATTRIBUTE) of the pool file `source`, in the organism at `root` whose
    manifest config is `config`: written to `<root>/derived/<name>.jsonl` (atomically, only when its content would
    change) and returned."""
    import json

    from forgetray.data.jsonl import read_jsonl

    if name not in WITHOUT_ATTRIBUTE:
        raise ValueError(f"{name!r} is not a derived restoring pool (known: {', '.join(WITHOUT_ATTRIBUTE)})")
    world = make_world(config["seed"], config["n_entities"], config["n_values"], config["n_templates"])
    records = without_attribute(read_jsonl(source), world, WITHOUT_ATTRIBUTE[name])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out = Path(root) / DERIVED_DIR / f"{name}.jsonl"
    if out.is_file() and out.read_text(encoding="utf-8") == text:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # concurrent resolutions each rename a complete file
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
