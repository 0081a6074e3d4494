"""forgetray.fit.trainer_class: Ray Train's TorchTrainer without the Ray Data callback a run without `datasets=`
never uses (it starts a DatasetManager actor for every run), and without the placement-group cleaner where Ray's state
API does not answer. These read the callbacks the trainer hands its controller; a real run without either actor is in
tests/test_tasks_sweep.py."""

from __future__ import annotations


def _callbacks(trainer_cls, **kwargs) -> list[str]:
    from ray.train import ScalingConfig

    trainer = trainer_cls(lambda: None, scaling_config=ScalingConfig(num_workers=1), **kwargs)
    return [type(c).__name__ for c in trainer._create_default_callbacks()]


def test_the_trainer_drops_ray_datas_callback_without_datasets_and_the_cleaner_when_asked():
    from ray.train.torch import TorchTrainer

    from forgetray.fit import trainer_class

    trainer = trainer_class()
    assert trainer is not TorchTrainer and issubclass(trainer, TorchTrainer), "this Ray's trainer is not reachable"
    ray_own = _callbacks(TorchTrainer)
    assert "DatasetsCallback" in ray_own and "PlacementGroupCleanerCallback" in ray_own
    assert _callbacks(trainer) == [name for name in ray_own if name != "DatasetsCallback"]
    # a run given Ray Data datasets keeps it (forgetray passes none; a dataset factory, so that no Ray starts here)
    assert _callbacks(trainer, datasets={"train": lambda: None}) == ray_own
    assert _callbacks(trainer_class(cleaner=False)) == [
        name for name in ray_own if name not in ("DatasetsCallback", "PlacementGroupCleanerCallback")]


def test_the_state_api_is_asked_of_the_ray_at_hand(ray_session):
    """A Ray without its dashboard has no state API (the cleaner's only way to see a dead controller). A cluster with
    one, whose runs keep their cleaners: tests/test_cluster_submit.py."""
    import ray

    from forgetray.sweep import _state_api

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert _state_api() is False
    finally:
        ray.shutdown()
