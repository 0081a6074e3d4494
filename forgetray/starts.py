"""The trained start of a trial with prior phases (its fine-tuning before the IFT phase), trained once per sweep for
every trial that shares it (`keys.prior_start_key`) and found by the others: a file lock on a shared filesystem,
the create-if-absent protocol of `forgetray.claims` on object storage. `trial._train_cohort` calls it before a
cohort's IFT run."""

from __future__ import annotations

import os
from pathlib import Path

from forgetray import fit
from forgetray import storage as store
from forgetray.plan import Phase
from forgetray.spec import TrialConfig


def ensure_start(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, priors: list[Phase]) -> Path:
    """The trained start of a trial with prior phases: trained here if no trial of the sweep has (yet), else found.

    An exclusive `fcntl.flock` on `<start>.lock` makes the trials that share the start wait for the one training it,
    across drivers on one node and across nodes on shared storage with working locks (NFS v4; not NFS v3 without
    lockd). The lock dies with its process, and the start is renamed into place complete (`worker.run_priors`), so
    a killed driver leaves either no start (the next one removes the partial folder and trains it) or all of it.
    The trial folder gets a link `ift_start` to it."""
    import fcntl
    import shutil

    from forgetray.train.worker import IFT_START, partial_start

    if store.is_remote(dirs["start_dir"]):
        return _ensure_start_remote(trial, resolved, dirs, context, priors)
    start = Path(dirs["start_dir"])
    if not start.is_dir():
        start.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{start}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes or the process dies
            if not start.is_dir():  # nobody trained it while this trial waited
                shutil.rmtree(partial_start(start), ignore_errors=True)
                fit.fit(trial, resolved, dirs, context, None, start.name, priors)
    link = Path(dirs["trial_dir"]) / IFT_START
    if not link.exists():
        link.unlink(missing_ok=True)  # a dangling link
        link.symlink_to(os.path.relpath(start, link.parent))
    return start


def _ensure_start_remote(trial: TrialConfig, resolved: dict, dirs: dict, context: dict, priors: list[Phase]) -> str:
    """`ensure_start` on object storage, which has no locks: the create-if-absent protocol (`forgetray.claims`).
    The trial that wins the claim trains the start into its own data folder (uploaded whole, then `.complete`) and
    publishes it; the others wait for the publication, or take over once the winner's heartbeat (this driver's
    thread) has stood still for `claims.LEASE_S`. The trial folder gets `ift_start.link` (the start's URI)."""
    from forgetray import claims
    from forgetray.train.worker import IFT_START

    start = dirs["start_dir"]
    got = store.acquire(start)
    if isinstance(got, claims.Claim):
        try:
            fit.fit(trial, resolved, {**dirs, "start_dir": store.SCHEME + got.data}, context, None,
                    store.name(start), priors)
        except BaseException:
            claims.release(store.S3Objects(), got)
            raise
        claims.publish(store.S3Objects(), got)
    store.write_text(store.join(dirs["trial_dir"], IFT_START + ".link"), str(store.published(start)) + "\n")
    return start
