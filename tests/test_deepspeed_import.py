"""`train.engine.import_deepspeed`: DeepSpeed as the workers load it, without the parts training never uses (its CPU
shared-memory all-reduce op, compiled at the first communicator, and its autotuner's MLflow import), in a fresh
process as a Ray Train worker starts one."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
from forgetray.train.engine import import_deepspeed
deepspeed = import_deepspeed()
from deepspeed.autotuning import autotuner
out = {"mlflow_loaded": "mlflow" in sys.modules, "autotuner_mlflow": autotuner.has_mlflow,
       "shm": deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"], "initialize": callable(deepspeed.initialize)}
import mlflow  # the worker's own later import still finds the real package
out["mlflow_after"] = hasattr(mlflow, "MlflowClient")
print(json.dumps(out))
"""


def test_deepspeed_loads_without_mlflow_and_without_the_shm_op():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"mlflow_loaded": False, "autotuner_mlflow": False, "shm": False, "initialize": True,
                     "mlflow_after": True}
