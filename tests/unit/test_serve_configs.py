"""Both Serve config files validate against Ray Serve's own schema and name every deployment of the app."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pipelines.settings import PROJECT_ROOT

DEPLOYMENTS = {"Ingress", "SD15Generator", "SDXLGenerator", "Refiner", "Upscaler"}


@pytest.mark.parametrize("path", [PROJECT_ROOT / "serve_config.yaml", PROJECT_ROOT / "configs" / "serve_local.yaml"])
def test_config_validates(path: Path):
    raw = yaml.safe_load(path.read_text())
    config = ServeDeploySchema(**raw)
    (application,) = config.applications
    assert application.import_path == "deployments.app:build_app"
    assert {deployment.name for deployment in application.deployments} == DEPLOYMENTS
    for deployment in raw["applications"][0]["deployments"]:
        # A replaced ray_actor_options dict drops num_cpus to 1: always give both.
        assert {"num_cpus", "num_gpus"} <= set(deployment["ray_actor_options"]), deployment["name"]


def test_production_generators_use_gpus_and_autoscale():
    config = ServeDeploySchema(**yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text()))
    by_name = {d.name: d for d in config.applications[0].deployments}
    for name in ("SD15Generator", "SDXLGenerator"):
        assert by_name[name].ray_actor_options.num_gpus >= 1
        autoscaling = by_name[name].autoscaling_config
        assert autoscaling["max_replicas"] > autoscaling["min_replicas"]
        assert by_name[name].max_queued_requests > 0
