#!/usr/bin/env bash
# Builds the project's environment in .venv at the repo root (idempotent: a stamp of pyproject.toml skips a
# rebuild when nothing changed). torch is installed first and pinned as a constraint for everything else,
# because an unpinned torch drags in GBs of CUDA wheels on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
# Headless Chromium for tests/test_mlflow_browser.py (it fails, saying how to install it, without one): Debian's
# package, quietly, where apt is usable as root, in the background while pip builds the venv (on a fresh machine the
# download and unpacking overlap pip's work; the script waits for it before it ends); elsewhere a hint (before the
# stamp check: a clean clone's CI too).
browser=""
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium (apt-get, beside the venv build) for the MLflow UI test ..."
    { { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
      echo "[setup] could not install chromium: tests/test_mlflow_browser.py will fail until it is installed" >&2; } &
    browser=$!
  else
    echo "[setup] no chromium: install it (apt-get install chromium) for tests/test_mlflow_browser.py" >&2
  fi
fi
constraints=""
finish() {
  [ -z "$constraints" ] || rm -f "$constraints"
  [ -z "$browser" ] || wait "$browser" || true
}
trap finish EXIT
TORCH_VERSION="${FORGETRAY_TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"
stamp=".venv/.forgetray-setup"
want="$(sha256sum pyproject.toml | cut -c1-16)-torch${TORCH_VERSION}"
# Where the environment forbids writing bytecode (PYTHONDONTWRITEBYTECODE), every process would compile its imports
# again (~16 s of CPU for the stack's, in each Ray worker); this venv keeps the compiled modules under
# .venv/pycache instead (nothing is written beside any source file). Elsewhere Python caches them as usual, and an
# explicit `python -B` writes nothing. tests/test_setup.py checks it.
bytecode_cache() {
  local purelib
  purelib="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import os, sys; sys.dont_write_bytecode and os.environ.get('PYTHONDONTWRITEBYTECODE') and (setattr(sys, 'pycache_prefix', os.path.join(sys.prefix, 'pycache')), setattr(sys, 'dont_write_bytecode', False))" >"$purelib/forgetray-bytecode.pth"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  bytecode_cache  # also for a venv built before it existed
  exit 0
fi
echo "[setup] building .venv (torch==${TORCH_VERSION}, then forgetray and its dependencies) ..."
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
bytecode_cache
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile: pip would compile all ~27,000 modules of the stack, one at a time (~65 s of the ~110 s install on the
# 2-core machine); a process compiles only what it imports, ~6,000 modules for the whole stack (docs/testing.md).
.venv/bin/python -m pip install -q --no-compile "torch==${TORCH_VERSION}"
constraints="$(mktemp)"
echo "torch==${TORCH_VERSION}" >"$constraints"
.venv/bin/python -m pip install -q --no-compile -c "$constraints" -e ".[test]"
echo "$want" >"$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, ray, deepspeed, mlflow, transformers; print(f"torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, mlflow {mlflow.__version__}, transformers {transformers.__version__}")' 2>/dev/null | tail -n 1)"  # DeepSpeed logs its accelerator to stdout first
