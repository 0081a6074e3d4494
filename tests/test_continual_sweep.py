"""The continual-learning metrics in a real sweep (local Ray, Ray Train + DeepSpeed ZeRO-0 on one CPU worker, sqlite
MLflow): one prior phase, then the IFT phase (3 epochs), with a failure after the IFT phase's last checkpoint so the
restarted run takes the resume path (prior phases skipped, their probes reported again). The logged matrix a[t][b] is
checked against unsharded probes of the saved models computed here, and forgetting / BWT against the formula applied
to those. The trial is one of the sweep test_methods_sweep.py runs (`shared_sweep`: one execution for both files)."""

from __future__ import annotations

import pytest

from test_methods_sweep import SWEEP, shared_sweep, trial_dir_of, trials_by_kind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def continual_sweep(tmp_path_factory, fixture_files):
    return shared_sweep(tmp_path_factory, fixture_files)


def test_continual_matrix_forgetting_and_bwt(continual_sweep, ray_session):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetray.data.questions import load_mc_jsonl
    from forgetray.probes import probe_knowledge, summarize_knowledge
    from forgetray.report.build import CONTINUAL_CSV, build_report

    tmp_path, uri, marker = continual_sweep["tmp_path"], continual_sweep["uri"], continual_sweep["marker"]
    fixture_files = continual_sweep["files"]  # the files the sweep ran on
    bench, other = continual_sweep["bench"], continual_sweep["other"]
    assert marker.exists(), "the injected failure did not happen"

    client = MlflowClient(uri)
    trials = trials_by_kind(client)
    (trial,) = trials["continual"]
    assert trial.info.status == "FINISHED" and trial.data.params["trial.epochs"] == "3"
    # The failure (after an IFT epoch 3) was this trial's: the sweep's other trials have fewer IFT epochs.
    assert all(int(t.data.params["trial.epochs"]) < 3 for kind in ("methods", "zero3") for t in trials[kind])
    run_id, params = trial.info.run_id, trial.data.params
    assert (params["phase.prior_1.data.own_benchmark"], params["phase.ift.data.own_benchmark"]) == (other, bench)

    def history(name):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))

    # Independent: each model probed here, unsharded, by its primary score.
    trial_dir = trial_dir_of(tmp_path, trial)
    models = [fixture_files["model"], trial_dir / "ift_start", trial_dir / "ift" / "epoch_003" / "model"]
    keys = {"bench": bench, "other": other}
    expected = []  # a[t][b], t = 0 (the fixture model), 1 (after the prior phase), 2 = T (the last IFT checkpoint)
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

    report = build_report(SWEEP, uri, tmp_path / "report", log_to_mlflow=False)
    assert (tmp_path / "report" / CONTINUAL_CSV).is_file() and "continual learning" in report.text
