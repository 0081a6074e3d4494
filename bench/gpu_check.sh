#!/usr/bin/env bash
# The GPU machine's one call (run from the repository root): install the prepared wheels, show the GPU, run
# bench/bench_gpu.py with its output in $OUT/bench_gpu.txt, then any quick extra checks (add them at the end).
#
# The device image has torch, transformers, accelerate, numpy, ... but not deepspeed, pydantic or hjson: .whl/ (not
# in git; see bench/README.md, "GPU training") holds deepspeed 0.19.8's pure-Python wheel and the missing runtime
# requirements for CPython 3.12 on manylinux x86_64. Extra arguments go to bench_gpu.py (e.g. --micro-batch 2).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

python3 --version
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit --format=csv
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, deepspeed.__file__)" 2>&1 | tail -1

timeout 420 python3 bench/bench_gpu.py "$@" 2>"$OUT/bench_gpu.stderr.txt" | tee "$OUT/bench_gpu.txt"
status=${PIPESTATUS[0]}
echo "bench_gpu.py exit status $status"
[ "$status" -eq 0 ] || tail -40 "$OUT/bench_gpu.stderr.txt"

# --- quick extra checks (the lead's) go below ---
# The evaluator at MMLU scale (bench/README.md "bench_eval.py"); needs lm-eval (a wheel in .whl/).
timeout 300 python3 bench/bench_eval.py --model 1b --device cuda --dtype bf16 --mmlu --batch-tokens 65536 \
    --fp32-ties 0.1 --rounds 1 2>"$OUT/bench_eval.stderr.txt" | tee "$OUT/bench_eval.txt"
echo "bench_eval.py exit status ${PIPESTATUS[0]}"

exit "$status"
