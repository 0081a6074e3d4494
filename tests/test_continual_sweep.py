"""The continual-learning metrics in a real sweep (local Ray, Ray Train + DeepSpeed ZeRO-0 on one CPU worker, sqlite
MLflow): one prior phase, then the IFT phase, with a failure after the IFT checkpoint so the restarted run takes
the resume path (prior phases skipped, their probes reported again). The logged matrix a[t][b] is checked against
unsharded probes of the saved models computed here, and forgetting / BWT against the formula applied to those."""

from __future__ import annotations

import os

import pytest

import fixtures

pytestmark = pytest.mark.slow


def test_continual_matrix_forgetting_and_bwt(tmp_path, fixture_files, ray_session):
    import ray
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray import Sweep, run
    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge
    from forgetray.report.build import CONTINUAL_CSV, build_report
    from forgetray.train.worker import FAIL_ONCE_ENV

    marker = tmp_path / "failed-once"
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "OMP_NUM_THREADS")}
    env[FAIL_ONCE_ENV] = f"{marker}:1"  # after the IFT phase's epoch-1 checkpoint; Ray Train restarts the worker
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bench, other = str(fixture_files["benchmark"]), str(fixtures.make_benchmark_file(tmp_path / "other.jsonl", n=30))
    sweep = Sweep(
        "continual", model=str(fixture_files["model"]), dataset=str(fixture_files["dataset"]), epochs=1, lr=5e-2,
        batch_size=8, max_length=256, workers=1, zero_stage=0, benchmarks=[bench, other], own_benchmark=bench,
        # Option likelihood: the fixture model's letter scores are one letter for every question (0.25 throughout),
        # which would not tell the steps apart.
        primary_score={bench: "acc", other: "acc_norm"},
        probe_set=str(fixture_files["probe_set"]), probe_passages=4, probe_batch_size=8,
        prior_phases=[{"dataset": str(fixture_files["dataset"]), "epochs": 1, "lr": 1e-2, "own_benchmark": other}],
    )
    run(sweep, tracking_uri=uri, storage=tmp_path / "storage")
    assert marker.exists(), "the injected failure did not happen"

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("continual")
    (trial,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("forgetray.kind") == "trial"]
    assert trial.info.status == "FINISHED"
    run_id, params = trial.info.run_id, trial.data.params
    assert (params["phase.prior_1.data.own_benchmark"], params["phase.ift.data.own_benchmark"]) == (other, bench)

    def history(name):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))

    # Independent: each model probed here, unsharded, by its primary score.
    trial_dir = next((tmp_path / "storage").glob("continual/*/trials/*"))
    models = [fixture_files["model"], trial_dir / "ift_start", trial_dir / "ift" / "epoch_001" / "model"]
    keys = {"bench": bench, "other": other}
    expected = []  # a[t][b], t = 0 (the fixture model), 1 (after the prior phase), 2 = T (the IFT checkpoint)
    for path in models:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        row = {}
        for key, file in keys.items():
            score = params[f"resolved.benchmarks.{key}.score"]
            score = {"letter": "letter_acc"}.get(score, score)
            frame = probe_knowledge(model, tokenizer, load_mc_jsonl(file), batch_size=4, max_length=256,
                                    bos="auto")  # as the trial probes a non-organism model
            row[key] = float(summarize_knowledge(frame)[score])
        expected.append(row)

    # The steps must differ for the checks below to tell them apart.
    assert len({tuple(sorted(row.items())) for row in expected}) == 3, expected
    for key in keys:
        # One value per step, none logged twice by the restarted run.
        logged = history(f"continual/{key}/knowledge")
        assert [step for step, _ in logged] == [0, 1, 2]
        for (step, value), row in zip(logged, expected):
            assert value == pytest.approx(row[key], abs=1e-6), (key, step)
        # a[1] is the IFT phase's start, which the base probes measure too.
        assert dict(history(f"base/{key}/knowledge"))[0] == pytest.approx(expected[1][key], abs=1e-6)
        forgetting = max(expected[0][key], expected[1][key]) - expected[2][key]
        assert history(f"continual/{key}/forgetting") == [(2, pytest.approx(forgetting, abs=1e-6))]
    # BWT: the prior phase's own benchmark (other), from after that phase to the end; the IFT step is not i < T.
    assert history("continual/bwt") == [(2, pytest.approx(expected[2]["other"] - expected[1]["other"], abs=1e-6))]

    report = build_report("continual", uri, tmp_path / "report", log_to_mlflow=False)
    assert (tmp_path / "report" / CONTINUAL_CSV).is_file() and "continual learning" in report.text
