"""Shared fixtures: local HF-format models and data, an offline hub cache, the test-sized organism, and Ray hygiene."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports huggingface_hub (it reads these once): no test may reach the network, and hub ids resolve
# from a cache the tests fill themselves. Ray workers inherit this environment.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="forgetray-hf-hub-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)  # each test process made its own
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Under pytest-xdist (`make test` runs two workers), each worker keeps its Rays under a root of its own: `ray.init()`
# joins the newest cluster it finds under its root, so two workers' clusters must not share one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"forgetray-{os.environ['PYTEST_XDIST_WORKER']}"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch.compile in tests (test_speed, test_bench_speed) compiles in its own process: inductor's default pool of compile
# workers, one per core each importing torch, cost more CPU than it saved on 2 cores (measured: 95 -> 80 CPU-s).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# The Ray Train settings `forgetray run` gives a Ray it starts, for the Rays tests start themselves too (inherited
# by the processes of a Ray started from here): faster polling, no preemption watcher actor per trainer.
from forgetray.sweep import LOCAL_RAY_ENV  # noqa: E402

for _name, _value in LOCAL_RAY_ENV.items():
    os.environ.setdefault(_name, _value)

import fixtures  # noqa: E402

HUB_ID = "forgetray-tests/tiny-llama"


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fixture-files")
    return {
        "model": fixtures.make_model_dir(root / "tiny-llama"),
        "dataset": fixtures.make_alpaca_file(root / "ift.jsonl", n=40),
        "benchmark": fixtures.make_benchmark_file(root / "bench.jsonl"),
        "probe_set": fixtures.make_passages_file(root / "probe.jsonl"),
    }


@pytest.fixture(scope="session")
def hub_model(fixture_files) -> str:
    """HUB_ID placed in the session's Hugging Face hub cache, laid out as `huggingface_hub` writes it, so loading the
    model by its hub id goes through the real hub code path (with HF_HUB_OFFLINE=1: nothing is downloaded)."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(fixture_files["model"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return HUB_ID


@pytest.fixture(scope="session")
def test_organism(tmp_path_factory) -> Path:
    """The tiny organism configuration, built once per test session (seconds)."""
    from forgetray import organism

    root = tmp_path_factory.mktemp("organism") / "built"
    organism.build(config=organism.OrganismConfig.for_tests(), root=root, progress=lambda _msg: None)
    return root


@pytest.fixture(scope="session")
def default_organism(tmp_path_factory) -> Path:
    """The DEFAULT organism, built once per test session from the shipped base weights (seconds, no pre-training)."""
    from forgetray import organism
    from forgetray.organism import shipped

    config = organism.OrganismConfig()
    if shipped.shipped_dir(config) is None:
        pytest.fail(f"no shipped weights for the default organism {config.fingerprint()} in {shipped.WEIGHTS_DIR}: "
                    "a change to OrganismConfig's defaults needs `forgetray organism build --pretrain --root DIR` "
                    "and `forgetray organism ship --root DIR`")
    return organism.build(config, root=tmp_path_factory.mktemp("default") / "organism", progress=lambda _: None)


@pytest.fixture
def use_test_organism(test_organism, monkeypatch):
    monkeypatch.setenv("FORGETRAY_ORGANISM", str(test_organism))
    from forgetray.resources import clear_cache

    clear_cache()
    yield test_organism
    clear_cache()


# The environment every sweep test's Ray workers need (the rest they inherit from this process anyway).
RAY_WORKER_ENV = ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "OMP_NUM_THREADS")
_LOCAL_RAY: dict = {}  # the Ray `local_ray` started in this test process: its settings and its GCS address


def local_ray(extra_env: dict[str, str] | None = None, num_cpus: int = 2) -> None:
    """This test process's local Ray for a sweep run in-process: one Ray serves every test that asks for the same
    CPUs and worker environment (a start costs 5-15 s here), restarted only for a test whose workers need other
    environment (a fault to inject, a data folder) or CPUs. `ray_session` stops any other Ray after its test, and
    `pytest_runtest_teardown` this one before a test that runs no sweep (and after the last test)."""
    import ray

    env = {name: os.environ[name] for name in RAY_WORKER_ENV} | (extra_env or {})
    want = (num_cpus, sorted(env.items()))
    if ray.is_initialized():
        if _LOCAL_RAY.get("want") == want and _LOCAL_RAY.get("address") == _gcs_address():
            return
        ray.shutdown()
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env})
    _LOCAL_RAY.update(want=want, address=_gcs_address())


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.fixture
def ray_session():
    """Tests that run sweeps in this process: they leave behind no Ray but `local_ray`'s."""
    import ray

    yield
    if ray.is_initialized() and _LOCAL_RAY.get("address") != _gcs_address():
        ray.shutdown()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the shared Ray once the next test of this process runs no sweep in-process (xdist tells a process its
    next test before it ends the current one): its idle processes (dashboard, agents, monitors) would otherwise take
    CPU from every test that follows."""
    import sys

    if nextitem is not None and "ray_session" in nextitem.fixturenames:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_collection_modifyitems(config, items):
    """The `slow` tests (minutes each) first, in their files' order: with two test processes (`make test`), the long
    ones then start at once and the short ones fill the gaps at the end, instead of one process finishing a long
    test alone while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
