"""Training on the DeepSpeed engine, inside Ray Train workers.

`worker.py` is the one function Ray Train runs per rank: it runs the phases of the trial's plan (`forgetray.plan`)
it was handed. What a phase does around its training lives in `ift.py` (probes, checkpoints SFT_e, the base model's
evaluation and the restoring set) and `restore.py` (R_e and the trajectory of Figure 3a); the prior phases' recipe is
short and in `worker.py`. Each gets the member's `RankContext` (`context.py`: the trial, its sources and folders,
rank, device, the resume point, reporting). They share `engine.py` (engine, epoch loop), `sam.py` (a SAM step on the engine),
`checkpoints.py` (what is written to storage), `retention.py` (which checkpoints keep DeepSpeed state: torch-free, its
pruner runs in Ray Train's controller), `evaluate.py` (probes sharded over the ranks), `deepspeed_config.py`
and `schedule.py` (pure).
"""
