"""The one JSON-lines reader and writer. Every JSONL file forgetray reads (instruction data, benchmarks, passage sets,
restoring pools, the organism's files) goes through `iter_jsonl`, so every malformed line gets the same error:
`ValueError("<file>:<line>: ...")`, naming the file and the 1-based line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator


def iter_jsonl(path: str | Path, *, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line number, record)` for each non-blank line (1-based, so a caller's own error about a record's
    fields reads f"{path}:{lineno}: ..."). Stops after `limit` records; invalid JSON raises ValueError naming
    file:line."""
    if limit is not None and limit <= 0:
        return
    count = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            yield lineno, record
            count += 1
            if limit is not None and count >= limit:
                return


def read_jsonl(path: str | Path, *, limit: int | None = None) -> list[Any]:
    """Every record of a JSONL file (the first `limit`), without locations."""
    return [record for _, record in iter_jsonl(path, limit=limit)]


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Write one JSON object per line (UTF-8, parent folders created); returns the number of records written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
