"""cluster.yaml validates against Ray's own cluster-launcher schema."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_matches_ray_schema():
    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(
        t["resources"].get("GPU", 0) > 0 and t["max_workers"] > t["min_workers"] for t in types.values()
    )
    assert any("mlflow server" in c for c in config["head_setup_commands"])


def test_schema_check_really_rejects_a_broken_file():
    config = yaml.safe_load(CLUSTER.read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
