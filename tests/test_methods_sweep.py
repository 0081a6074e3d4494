"""The mitigation methods in a real sweep (local Ray, Ray Train + DeepSpeed ZeRO-2, sqlite MLflow): prior phases,
then an IFT phase with or without SAM, with rehearsal, Wise-FT and the flatness surface at every checkpoint; checked
against the saved weights and independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import local_ray
import torch

from forgetray.data.rehearsal import replay_count

pytestmark = pytest.mark.slow


SWEEP = "methods"  # the one sweep of this file and of test_continual_sweep.py
# Its execution, once per test session: the tmp folder, tracking uri, fail-once marker, benchmarks and the fixture
# files it ran on (the tests read those, not their own process's copies).
_SHARED: dict = {}


def shared_sweep(tmp_path_factory, fixture_files) -> dict:
    """One sweep execution (local Ray with 2 CPU slots; Ray, Tune and Train start once) whose trials serve both tests
    of this file and test_continual_sweep.py, as `cases` of one grid (each test reads its own trials, found by their
    ZeRO stage):
    - the two methods trials (ZeRO-2, one worker, two prior phases, SAM rho 0 / 0.05, rehearsal, Wise-FT, flatness);
    - the ZeRO-3 trial (2 workers, no prior phases, 1 epoch);
    - the continual trial (ZeRO-0, one worker, one prior phase, 3 IFT epochs, two benchmarks) and the failure after
      its last IFT checkpoint (FORGETRAY_FAIL_ONCE at epoch 3: only this trial has an IFT epoch 3), so that its
      restarted run takes the resume path.
    At most two trials at once. Run once per test session by whichever test needs it first, in whichever xdist process:
    the processes of a session share their temporary folder's parent, where a file lock makes the other one wait for
    the result (its paths, as JSON) instead of running the sweep again (xdist's test distribution put these tests in
    both processes, and each ran the whole sweep: ~2.5-4.5 min each; its `loadgroup` mode does not group under pytest
    9.2)."""
    import fcntl
    import os

    if not _SHARED:
        folder = tmp_path_factory.getbasetemp()
        folder = folder.parent if os.environ.get("PYTEST_XDIST_WORKER") else folder
        result = folder / f"{SWEEP}-sweep.json"
        with open(f"{result}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            if not result.exists():
                result.write_text(json.dumps(_run_shared_sweep(tmp_path_factory, fixture_files)))
        found = json.loads(result.read_text())
        _SHARED.update(found, **{k: Path(found[k]) for k in ("tmp_path", "marker") if k in found},
                       files={k: Path(v) for k, v in found.get("files", {}).items()})
    if "error" in _SHARED:  # the execution failed for an earlier test: not run again
        raise RuntimeError(f"the shared sweep failed: {_SHARED['error']}")
    return _SHARED


def _run_shared_sweep(tmp_path_factory, fixture_files) -> dict:
    """`shared_sweep`'s execution; what the tests need of it as plain data (or the error it failed with)."""
    import fixtures
    from forgetray import Sweep, run
    from forgetray.train.worker import FAIL_ONCE_ENV

    tmp_path = tmp_path_factory.mktemp("methods-sweep")
    marker = tmp_path / "failed-once"
    bench = str(fixture_files["benchmark"])
    other = str(fixtures.make_benchmark_file(tmp_path / "other.jsonl", n=30))
    fail_once = {FAIL_ONCE_ENV: f"{marker}:3"}  # after the continual trial's IFT epoch-3 checkpoint; Ray Train restarts it
    methods = dict(
        epochs=2, lr=3e-3, workers=1, zero_stage=2, benchmarks=[bench], probe_passages=16,
        # Two prior phases, the second with its own method switch: engines are rebuilt on the same module.
        prior_phases=[{"dataset": str(fixture_files["dataset"]), "epochs": 1, "lr": 1e-3},
                      {"dataset": str(fixture_files["dataset"]), "epochs": 1, "sam_rho": 0.05}],
        rehearsal_ratio=0.25, wiseft_alpha=0.5, flatness_grid=5, flatness_batch=4,
        keep_optimizer_state="all", delete_finished_state=False,  # the trained (un-mixed) weights are read below
    )
    zero3 = dict(epochs=1, lr=3e-3, workers=2, zero_stage=3, benchmarks=[bench], probe_passages=16)
    continual = dict(
        epochs=3, lr=5e-2, workers=1, zero_stage=0, benchmarks=[bench, other],
        # Option likelihood: the fixture model's letter scores are one letter for every question (0.25 throughout),
        # which would not tell the steps apart.
        primary_score={bench: "acc", other: "acc_norm"}, probe_passages=4, probe_batch_size=8,
        prior_phases=[{"dataset": str(fixture_files["dataset"]), "epochs": 1, "lr": 1e-2, "own_benchmark": other}],
    )
    sweep = Sweep(
        SWEEP, model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), batch_size=8,
        max_length=256, probe_set=str(fixture_files["probe_set"]), max_concurrent_trials=2,
        # The IFT phase's own benchmark, the continual trial's; set for every trial (all have it) rather than in its
        # case: with own_benchmark varying between trials, build_report's continual table fails (a forgetray bug:
        # the setting's column and the table's own `own_benchmark` column collide).
        own_benchmark=bench,
        cases=[{**methods, "sam_rho": 0.0}, {**methods, "sam_rho": 0.05}, continual, zero3],
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local_ray(fail_once)
    try:
        run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    except Exception:  # noqa: BLE001 (every test that uses it fails with it, traceback included)
        import traceback

        return {"error": traceback.format_exc()}
    return {"tmp_path": str(tmp_path), "uri": uri, "marker": str(marker), "bench": bench, "other": other,
            "files": {k: str(v) for k, v in fixture_files.items()}}


def trials_by_kind(client) -> dict[str, list]:
    """The shared sweep's trial runs by what they serve: "methods" (ZeRO-2), "zero3", "continual" (ZeRO-0)."""
    exp = client.get_experiment_by_name(SWEEP)
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"]
    kinds = {"2": "methods", "3": "zero3", "0": "continual"}
    found: dict[str, list] = {kind: [] for kind in kinds.values()}
    for t in trials:
        found[kinds[t.data.params["trial.zero_stage"]]].append(t)
    assert len(trials) == 4 and {k: len(v) for k, v in found.items()} == {"methods": 2, "zero3": 1, "continual": 1}
    return found


def trial_dir_of(tmp_path: Path, trial) -> Path:
    """A trial's folder, found through the MLflow run id it stores."""
    (found,) = [d for d in (tmp_path / "storage").glob(f"{SWEEP}/*/trials/*")
                if (d / "mlflow_run_id").is_file() and (d / "mlflow_run_id").read_text().strip() == trial.info.run_id]
    return found


@pytest.fixture(scope="module")
def methods_sweep(tmp_path_factory, fixture_files):
    return shared_sweep(tmp_path_factory, fixture_files)


def test_stages_sam_rehearsal_wiseft_and_flatness(methods_sweep, ray_session):
    """Two trials equal but for the IFT phase's SAM (rho 0 and 0.05), side by side: the same prior phases give
    bit-identical IFT starts, SAM changes the trained weights and the loss, and the methods act as documented."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray import flatness

    tmp_path, uri, fixture_files = methods_sweep["tmp_path"], methods_sweep["uri"], methods_sweep["files"]
    n_examples = 40  # fixture_files["dataset"]

    client = MlflowClient(uri)
    trials = trials_by_kind(client)["methods"]
    assert len(trials) == 2 and {t.info.status for t in trials} == {"FINISHED"}
    by_rho = {float(t.data.params["trial.sam_rho"]): t for t in trials}
    assert sorted(by_rho) == [0.0, 0.05]
    # Each trial's folder, found through the MLflow run id it stores.
    dirs = {(d / "mlflow_run_id").read_text().strip(): d
            for d in (tmp_path / "storage").glob("methods/*/trials/*") if (d / "mlflow_run_id").is_file()}
    assert len(dirs) == 4  # the two methods trials, the continual and the ZeRO-3 one
    trial_dirs = {rho: dirs[t.info.run_id] for rho, t in by_rho.items()}

    def metric_history(trial, names):
        return {k: [(m.step, m.value) for m in client.get_metric_history(trial.info.run_id, k)] for k in names}

    names = ("train/examples", "train/loss", "sft/flatness/sc", "sft/flatness/ag", "sft/flatness/mag",
             "sft/flatness/flatness", "prior/1/train/loss", "prior/2/train/loss")
    histories = {rho: metric_history(t, names) for rho, t in by_rho.items()}
    trial, history, trial_dir = by_rho[0.05], histories[0.05], trial_dirs[0.05]
    # Rehearsal: the phase trains on its own examples plus the replayed quarter of the prior phase's.
    replayed = replay_count(n_examples, 0.25)
    assert replayed == 10 and history["train/examples"] == [(1, n_examples + replayed), (2, n_examples + replayed)]
    for k in (1, 2):
        # one epoch per prior phase, logged at step = that phase's epoch, the same in both trials (deterministic)
        assert [step for step, _ in history[f"prior/{k}/train/loss"]] == [1]
        assert histories[0.0][f"prior/{k}/train/loss"] == history[f"prior/{k}/train/loss"]

    start = AutoModelForCausalLM.from_pretrained(trial_dir / "ift_start")
    base = AutoModelForCausalLM.from_pretrained(fixture_files["model"])
    assert not torch.equal(start.lm_head.weight, base.lm_head.weight), "the prior phases did not train"
    # The prior phases are the same for both trials: trained once for the sweep (one start folder, one Ray Train run
    # of them, both trials' `ift_start` pointing at it), so their IFT starts are the same weights. The shared sweep's
    # continual trial has other prior phases, so the execution has exactly one other start (with its own Ray Train
    # run): the continual trial's.
    (execution,) = (tmp_path / "storage" / SWEEP).iterdir()
    starts = [p for p in (execution / "start").iterdir() if p.is_dir() and not p.name.startswith(".")]
    (continual,) = trials_by_kind(client)["continual"]
    continual_start = (trial_dir_of(tmp_path, continual) / "ift_start").resolve()
    kept = {p.resolve() for p in starts if not p.name.endswith(".train")}
    assert len(kept) == 2 and continual_start in kept, starts
    assert len([p for p in starts if p.name.endswith(".train")]) == 2, starts
    assert {(d / "ift_start").resolve() for d in trial_dirs.values()} == kept - {continual_start}
    for name in ("continual/bench/knowledge",):  # each trial's run has the start's probes, the same values
        a, b = (sorted(metric_history(by_rho[rho], [name])[name]) for rho in (0.0, 0.05))
        assert a[:3] == b[:3] and [s for s, _ in a[:3]] == [0, 1, 2]
    plain_start = AutoModelForCausalLM.from_pretrained(trial_dirs[0.0] / "ift_start").state_dict()
    start_state = start.state_dict()
    assert plain_start.keys() == start_state.keys()
    for name, value in start_state.items():
        assert torch.equal(value, plain_start[name]), name

    def trained_weights(rho, epoch):
        ckpt = trial_dirs[rho] / "ift" / f"epoch_{epoch:03d}"
        return torch.load(next((ckpt / "deepspeed" / "state").glob("mp_rank_00_model_states.pt")),
                          weights_only=False)["module"]

    # SAM acted: from identical starts, the trained weights after IFT epoch 1 differ far beyond float noise (twins
    # with the same start and settings differ by 0), and so does the logged training loss.
    with_sam, without = trained_weights(0.05, 1), trained_weights(0.0, 1)
    assert with_sam.keys() == without.keys()
    difference = max(float((with_sam[k].float() - without[k].float()).abs().max()) for k in with_sam)
    assert difference > 1e-4, f"SAM and plain IFT left (almost) the same weights: max |diff| = {difference}"
    loss_sam, loss_plain = dict(history["train/loss"]), dict(histories[0.0]["train/loss"])
    assert sorted(loss_sam) == sorted(loss_plain) == [1, 2]
    assert abs(loss_sam[1] - loss_plain[1]) > 1e-6, (loss_sam, loss_plain)

    for epoch in (1, 2):
        ckpt = trial_dir / "ift" / f"epoch_{epoch:03d}"
        # Wise-FT: the checkpoint's model is the even mix of the phase's start and the trained weights, which the
        # DeepSpeed state holds (training continues from those).
        trained = trained_weights(0.05, epoch)
        mixed = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
        for name, value in mixed.state_dict().items():
            expected = 0.5 * start_state[name].float() + 0.5 * trained[name].float()
            assert torch.allclose(value, expected, atol=1e-6), name
        assert not torch.equal(trained["lm_head.weight"], start_state["lm_head.weight"])

        # Flatness: the logged metrics are those of the saved surface, whose centre is the checkpoint's own loss
        # on the fixed batch (the first 4 probing passages), recomputed here without forgetray's code.
        surface = np.load(ckpt / "probes" / "flatness_surface.npy")
        assert surface.shape == (5, 5) and (ckpt / "probes" / "flatness.png").stat().st_size > 1000
        metrics = flatness.surface_metrics(surface, h=0.5)
        for key in ("sc", "ag", "mag", "flatness"):
            assert dict(history[f"sft/flatness/{key}"])[epoch] == pytest.approx(metrics[key], rel=1e-6)
        tokenizer = AutoTokenizer.from_pretrained(ckpt / "model")
        texts = [json.loads(line)["text"] for line in Path(fixture_files["probe_set"]).read_text().splitlines()][:4]
        nll, count = 0.0, 0
        with torch.no_grad():
            for text in texts:
                ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]])
                logits = mixed(input_ids=ids).logits[0, :-1]
                nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        assert surface[2, 2] == pytest.approx(nll / count, rel=1e-5)

    art = client.list_artifacts(trial.info.run_id, "probes/sft/epoch_002")
    assert {"flatness.png", "flatness_surface.npy"} <= {Path(a.path).name for a in art}


def test_zero3_trial_on_two_cpu_workers(methods_sweep, ray_session):
    """ZeRO-3 (weights partitioned over 2 ranks, gathered for the saved model) trains, probes and saves a model that
    loads and differs from the base; its probe equals an unsharded probe of the saved model."""
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge

    tmp_path, uri, fixture_files = methods_sweep["tmp_path"], methods_sweep["uri"], methods_sweep["files"]
    client = MlflowClient(uri)
    (trial,) = trials_by_kind(client)["zero3"]
    assert trial.info.status == "FINISHED" and trial.data.params["deepspeed.zero_optimization.stage"] == "3"
    assert trial.data.params["trial.workers"] == "2" and trial.data.params["trial.prior_phases"] == "[]"
    ckpt = trial_dir_of(tmp_path, trial) / "ift" / "epoch_001"
    model = AutoModelForCausalLM.from_pretrained(ckpt / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(fixture_files["model"])
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)
    with torch.no_grad():
        frame = probe_knowledge(model, AutoTokenizer.from_pretrained(ckpt / "model"),
                                load_mc_jsonl(fixture_files["benchmark"]), batch_size=4, max_length=256,
                                bos="auto")  # the trial's rule for a non-organism model (README: `bos`)
    logged = client.get_metric_history(trial.info.run_id, "sft/bench/acc")
    assert logged[-1].value == pytest.approx(summarize_knowledge(frame)["acc"], abs=1e-5)
