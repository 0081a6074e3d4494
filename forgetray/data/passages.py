"""Plain-text passage sets (probing set, restoring pool): JSONL records with a "text" field."""

from __future__ import annotations

from pathlib import Path

from forgetray.data.jsonl import iter_jsonl


def load_passages(path: Path, limit: int | None = None) -> list[str]:
    """The first `limit` passages (all if None). Malformed lines raise ValueError naming file:line."""
    texts: list[str] = []
    for lineno, record in iter_jsonl(path, limit=limit):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{lineno}: expected an object with a non-empty string field 'text'")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no passages")
    return texts


def load_passage_set(source: dict, limit: int | None = None) -> list[str]:
    """The passages of a resolved set (see resources.resolve_passages): a local JSONL file or a hub dataset."""
    if source.get("kind") == "hub":
        from itertools import islice

        from forgetray.data.hub import iter_texts

        return list(islice(iter_texts(source["path"]), limit))
    return load_passages(source["path"], limit=limit)
