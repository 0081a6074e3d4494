"""What scripts/setup.sh leaves in the venv beyond the packages: pip compiles no bytecode there, so where the
environment sets PYTHONDONTWRITEBYTECODE a `.pth` keeps what each process compiles under `<venv>/pycache` (else every
process, every Ray worker, compiles its imports again), writes nothing beside a source file, and leaves `python -B`
alone. Each case runs in a fresh interpreter of this venv on a module no process has imported before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _import_fresh(folder: Path, *flags: str, **env: str) -> None:
    (folder / "fresh_module.py").write_text("VALUE = 41 + 1\n")
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | env
    done = subprocess.run([sys.executable, *flags, "-c", "import fresh_module; assert fresh_module.VALUE == 42"],
                          cwd=folder, env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def _cached(folder: Path) -> Path:
    """Where Python puts a module's bytecode under a pycache prefix: the prefix, then the source folder's path."""
    return Path(sys.prefix, "pycache", *folder.resolve().parts[1:], f"fresh_module.{sys.implementation.cache_tag}.pyc")


def test_bytecode_is_cached_in_the_venv_when_the_environment_forbids_writing_it(tmp_path):
    _import_fresh(tmp_path, PYTHONDONTWRITEBYTECODE="1")
    assert _cached(tmp_path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh_module.py"]  # nothing beside the source


def test_an_explicit_dash_b_writes_nothing(tmp_path):
    _import_fresh(tmp_path, "-B")
    assert not _cached(tmp_path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh_module.py"]


def test_without_the_setting_python_caches_beside_the_source_as_usual(tmp_path):
    _import_fresh(tmp_path)
    assert not _cached(tmp_path).exists()
    assert [p.name for p in (tmp_path / "__pycache__").iterdir()] == [
        f"fresh_module.{sys.implementation.cache_tag}.pyc"]
