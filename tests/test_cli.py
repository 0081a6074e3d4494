"""The CLI on bad input: one line naming what is wrong, exit code 2, before Ray starts, nothing written."""

from __future__ import annotations

import textwrap

import pytest

from forgetray.cli import EXIT_BAD_INPUT, EXIT_OK, main


def write_sweep(path, body: str):
    path.write_text("# forgetray run " + path.name + "\nfrom forgetray import Sweep, grid\n" + textwrap.dedent(body))
    return str(path)


@pytest.fixture
def files(fixture_files):
    return {k: str(v) for k, v in fixture_files.items()}


def good_settings(files, **extra) -> str:
    settings = {"model": repr(files["model"]), "dataset": repr(files["dataset"]),
                "benchmarks": repr([files["benchmark"]]), "probe_set": repr(files["probe_set"]), **extra}
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def test_validate_accepts_a_good_sweep(in_tmp_cwd, files, capsys):
    path = write_sweep(in_tmp_cwd / "good.py", f"sweep = Sweep('good', {good_settings(files, epochs='grid([1, 2])')})\n")
    assert main(["validate", path]) == EXIT_OK
    out = capsys.readouterr().out
    assert "2 trial(s)" in out
    # the default cosine schedule depends on the total: the epochs grid is trained twice, and validate says why
    assert "training epochs: 3 without sharing, 3 with (epoch prefixes: 3 -> 3)" in out
    assert "epochs grid not shared: lr_schedule 'cosine' depends on the total steps" in out


def test_validate_says_which_setting_follows_which(in_tmp_cwd, files, capsys):
    rule = 'per("seed", {0: 1e-3})'
    body = "from forgetray import per\n" + f"sweep = Sweep('per', {good_settings(files, lr=rule)})\n"
    assert main(["validate", write_sweep(in_tmp_cwd / "per.py", body)]) == EXIT_OK
    assert "lr follows seed: 0 -> 0.001" in capsys.readouterr().out


def test_validate_counts_the_training_sam_cf_shares():
    """sweeps/sam_cf.py: 3 models x 3 datasets x rho 3 x Wise-FT 2 x rehearsal 2 x epochs {1, 2} = 216 trials; the
    3-epoch Alpaca phase is 648 epochs unshared, 9 trained once per model; the IFT phase 108 x (1 + 2) = 324 epochs,
    216 with each 1-epoch point taken from its 2-epoch twin."""
    from pathlib import Path

    from forgetray.cli import load_sweep
    from forgetray.sharing import describe

    # validate prints these lines after resolving the sweep's inputs, which needs the hub here (tests run offline)
    sweep_file = str(Path(__file__).resolve().parents[1] / "sweeps" / "sam_cf.py")
    sweep = load_sweep(sweep_file)
    assert describe(list(sweep.trials), sweep.share_trajectories) == [
        "training epochs: 972 without sharing, 225 with (prior phases trained once per start: 648 -> 9; "
        "epoch prefixes: 324 -> 216)"]
    off = load_sweep(sweep_file, ["share_trajectories=false"])
    assert describe(list(off.trials), off.share_trajectories) == [
        "training epochs: 972 without sharing, 333 with (prior phases trained once per start: 648 -> 9; "
        "epoch prefixes: 324 -> 324)", "epochs grid not shared: share_trajectories=False"]


@pytest.mark.parametrize("override, message", [
    ({"foo": "1"}, "unknown axis 'foo'"),
    ({"dataset": "'alpaca-gpt4'"}, "setting 'dataset': unknown dataset 'alpaca-gpt4'"),
    ({"epochs": "'three'"}, "setting 'epochs' must be int, got str"),
    ({"epochs": "grid([])"}, "grid([]) is empty"),
    ({"epochs": "0"}, "setting 'epochs' must be >= 1"),
    ({"dataset": "'missing.jsonl'"}, "data file 'missing.jsonl' does not exist"),
    ({"model": "'./no/such/model'"}, "model directory './no/such/model' does not exist"),
    ({"benchmarks": "['nope.jsonl']"}, "benchmark file 'nope.jsonl' does not exist"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(in_tmp_cwd, files, capsys, override, message, command):
    import ray

    if ray.is_initialized():  # the test process's shared Ray (conftest.local_ray): the check below needs none
        ray.shutdown()
    path = write_sweep(in_tmp_cwd / "bad.py", f"sweep = Sweep('bad', {good_settings(files, **override)})\n")
    assert main([command, path]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and err.startswith("forgetray: error: ")
    assert not ray.is_initialized()
    assert sorted(p.name for p in in_tmp_cwd.iterdir()) == ["bad.py"]  # no store, no storage, no run


def test_malformed_data_file_names_its_line(in_tmp_cwd, files, capsys):
    data = in_tmp_cwd / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "x"}\n')
    path = write_sweep(in_tmp_cwd / "s.py", f"sweep = Sweep('s', {good_settings(files, dataset=repr(str(data)))})\n")
    assert main(["run", path]) == EXIT_BAD_INPUT
    assert "broken.jsonl:3: missing field 'output'" in capsys.readouterr().err


def test_sweep_file_problems(in_tmp_cwd, capsys):
    assert main(["validate", "nope.py"]) == EXIT_BAD_INPUT
    assert "sweep file 'nope.py' does not exist" in capsys.readouterr().err
    path = write_sweep(in_tmp_cwd / "nosweep.py", "x = 1\n")
    assert main(["validate", path]) == EXIT_BAD_INPUT
    assert "must define a module-level `sweep" in capsys.readouterr().err
    path = write_sweep(in_tmp_cwd / "typo.py", "\n\nsweep = Sweep('t', epochs=grid([1, 0]))\n")
    assert main(["validate", path]) == EXIT_BAD_INPUT
    assert "typo.py:5: setting 'epochs' must be >= 1" in capsys.readouterr().err


def test_set_overrides_are_validated(in_tmp_cwd, files, capsys):
    path = write_sweep(in_tmp_cwd / "s.py", f"sweep = Sweep('s', {good_settings(files)})\n")
    assert main(["validate", path, "--set", "epochs=[1,2,3]"]) == EXIT_OK
    assert "3 trial(s)" in capsys.readouterr().out
    assert main(["validate", path, "--set", "epoch=3"]) == EXIT_BAD_INPUT
    assert "unknown axis 'epoch'" in capsys.readouterr().err


def test_every_sweep_file_starts_with_its_command_and_validates_offline():
    """sweeps/*.py: first line is the command that runs it; cluster sweeps name hub models, which only resolve on
    the cluster, so here they are checked for structure (the file loads and builds a Sweep)."""
    from pathlib import Path

    from forgetray.cli import load_sweep

    from forgetray.sharing import training_epochs

    # Each shipped sweep's trials and training epochs, worked out by hand from its file. Epochs "without" sharing =
    # prior-phase epochs of every trial + IFT epochs of every trial + one restoring pass per checkpoint (trials with
    # a restore_pool); "with" = prior phases once per distinct start + IFT once per trajectory (epoch prefixes only
    # with lr_schedule constant/step and no warm-up) + restorations once per trajectory checkpoint.
    expected = {
        # dataset 2 x iv_task 2 = 4 trials x 10 epochs; restore_pool set: 40 IFT + 40 restoring; no epochs grid
        "iv_guided.py": (4, 80, 80),
        # cases 4 x replicates 6 = 24 trials x 4 epochs: 96 IFT + 96 restoring; cosine: nothing shared
        "iv_guided_organism.py": (24, 192, 192),
        # model 2 x dataset 2 = 4 trials x 10 epochs: 40 IFT + 40 restoring
        "pattern_shift.py": (4, 80, 80),
        # model 2 x dataset 2 x replicates 3 = 12 trials x 4 epochs: 48 IFT + 48 restoring
        "quickstart.py": (12, 96, 96),
        # model 3 x dataset 3 x epochs 2 x sam_rho 3 x wiseft 2 x rehearsal 2 = 216 trials; prior 3 epochs each:
        # 648 without, 3 starts (one per model) x 3 = 9 with; IFT 108 x 1 + 108 x 2 = 324 without, the step
        # schedule shares each 1-epoch trial with its 2-epoch twin: 108 x 2 = 216 with; no restoring.
        # 648 + 324 = 972 without, 9 + 216 = 225 with (the numbers the README and the file's docstring quote)
        "sam_cf.py": (216, 972, 225),
        # sam_rho 2 x wiseft 2 x rehearsal 2 = 8 trials x 3 epochs (cosine: 24 IFT either way); prior 1 epoch
        # each: 8 without, 1 start with (one model, one seed); no restoring: 32 without, 25 with
        "sam_cf_organism.py": (8, 32, 25),
    }
    files = sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.py"))
    assert [f.name for f in files] == sorted(expected), "a sweep file was added or removed: give it its hand values"
    for file in files:
        first = file.read_text().splitlines()[0]
        assert first.startswith("# forgetray run sweeps/" + file.name), f"{file.name}: first line is {first!r}"
        sweep = load_sweep(str(file))
        counted = training_epochs(list(sweep.trials), sweep.share_trajectories)
        assert (sweep.size, counted["without"], counted["with"]) == expected[file.name], file.name
