"""cluster.yaml is a valid Ray cluster-launcher config (checked against Ray's own launcher schema)."""

from pathlib import Path

import yaml


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster.yaml").read_text())
    # As `ray up` does: merge the provider's defaults (a local file, no cloud call), then check Ray's schema.
    validate_config(fillout_defaults(config))  # raises on a schema violation
    assert config["head_node_type"] in config["available_node_types"]
    assert any("scripts/setup.sh" in cmd for cmd in config["setup_commands"])


def test_cluster_yaml_takes_jobs_with_auth_and_binds_the_dashboard_to_localhost():
    """A launched cluster can take `ray job submit`: its setup installs ray[default] (the job server), every node
    starts with token auth and the same token, the dashboard listens on the head's 127.0.0.1 (`ray dashboard
    cluster.yaml` tunnels to it), and the repo is synced without .venv / results."""
    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "cluster.yaml").read_text())
    assert '"ray[default,' in (root / "pyproject.toml").read_text()  # setup.sh installs pyproject's dependencies
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    head = next(c for c in config["head_start_ray_commands"] if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    assert ".rayignore" in config["rsync_filter"]
