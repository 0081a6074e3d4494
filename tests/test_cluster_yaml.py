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
