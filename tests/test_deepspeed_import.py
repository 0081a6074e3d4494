"""`train.engine.import_deepspeed`: DeepSpeed as the workers load it, without the parts training never uses (its CPU
shared-memory all-reduce op, compiled at the first communicator, its autotuner's MLflow import, and the compilation
of its Muon optimizer's functions), in a fresh process as a Ray Train worker starts one; and a full fine-tune that
never loads peft."""

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
import torch
from deepspeed.runtime.zero.muon import original_muon
# DeepSpeed's ZeRO engines import the Muon module: it is loaded, its functions not compiled (torch.compile wraps
# them), torch.compile is torch's own again, and inductor is not loaded
out["muon"] = (hasattr(original_muon.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable"),
               torch.compile.__module__, "torch._inductor.compile_fx" in sys.modules)
from forgetray.train import lora
out["lora"] = (lora.is_lora(torch.nn.Linear(2, 2)), "peft" in sys.modules)
import mlflow  # the worker's own later import still finds the real package
out["mlflow_after"] = hasattr(mlflow, "MlflowClient")
print(json.dumps(out))
"""


def test_deepspeed_loads_without_mlflow_the_shm_op_or_inductor_and_peft_stays_unloaded():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"mlflow_loaded": False, "autotuner_mlflow": False, "shm": False, "initialize": True,
                     "muon": [False, "torch", False], "lora": [False, False], "mlflow_after": True}
