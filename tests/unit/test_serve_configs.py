"""Both Serve config files validate against Ray Serve's own schema and name every deployment of the app."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pipelines.families import FAMILIES
from pipelines.settings import PROJECT_ROOT

# Every family of the table has its generator deployment in both configs.
DEPLOYMENTS = {"Ingress", "Upscaler", *(family.deployment for family in FAMILIES.values())}


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
    for name in [family.deployment for family in FAMILIES.values() if family.txt2img]:
        assert by_name[name].ray_actor_options.num_gpus >= 1
        autoscaling = by_name[name].autoscaling_config
        assert autoscaling["max_replicas"] > autoscaling["min_replicas"]
        assert by_name[name].max_queued_requests > 0


def test_the_grafana_dashboard_queries_only_metrics_the_service_defines():
    import json
    import re

    dashboard = json.loads((PROJECT_ROOT / "configs" / "grafana_dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    source = (PROJECT_ROOT / "deployments" / "metrics.py").read_text()
    defined = set(re.findall(r'"(diffusion_api_[a-z_]+)"', source))
    assert {"diffusion_api_jobs", "diffusion_api_jobs_finished", "diffusion_api_webhooks"} <= defined
    used = {name for expr in expressions for name in re.findall(r"\b(?:ray_)?(diffusion_api_[a-z_]+)", expr)}
    suffixes = ("_total", "_bucket", "_sum", "_count")
    assert used and all(any(name == d or name == d + s for d in defined for s in suffixes) for name in used), used
    assert len(dashboard["panels"]) >= 9  # and every metric of metrics.py has a panel:
    for metric in defined:
        assert any(metric in expr for expr in expressions), metric
