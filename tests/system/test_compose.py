"""docker-compose.yml is valid and runs every part of the system."""

import os
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture
def compose() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (.ci/run installs it)")
        pytest.skip("docker-compose (Debian package) not installed")
    return binary


def test_compose_file_validates(compose):
    result = subprocess.run([compose, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_runs_every_service(compose):
    result = subprocess.run([compose, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True, text=True, check=True)
    services = {name for name, service in yaml.safe_load(result.stdout)["services"].items() if not service.get("profiles")}
    assert services == {"rabbitmq", "mongodb", "redis", "mailchimp-sandbox", "klaviyo-sandbox", "sendgrid-sandbox", "shopify-sandbox",
                        "receiver", "worker", "sync", "poller", "admin", "feed"}


def test_compose_syncs_to_all_three_sandboxes(compose):
    result = subprocess.run([compose, "-f", "docker-compose.yml", "config"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "MERGETAG_ESPS: mailchimp,klaviyo,sendgrid" in result.stdout
    assert "http://klaviyo-sandbox:8084" in result.stdout and "http://sendgrid-sandbox:8085" in result.stdout


def test_the_cluster_profile_runs_three_brokers_a_replica_set_and_two_of_each_process(compose):
    result = subprocess.run([compose, "-f", "docker-compose.yml", "--profile", "cluster", "config"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    services = yaml.safe_load(result.stdout)["services"]
    assert {"rabbitmq-1", "rabbitmq-2", "rabbitmq-3", "mongo-1", "mongo-2", "mongo-3", "receivers",
            "receiver-1", "receiver-2", "worker-1", "worker-2", "sync-1", "sync-2"} <= set(services)
    nodes = "amqp://guest:guest@rabbitmq-1:5672/%2F,amqp://guest:guest@rabbitmq-2:5672/%2F,amqp://guest:guest@rabbitmq-3:5672/%2F"
    for name in ("receiver-1", "receiver-2", "worker-1", "worker-2", "sync-1", "sync-2"):
        env = services[name]["environment"]
        assert env["MERGETAG_AMQP_URL"] == nodes
        assert env["MERGETAG_MONGODB_URI"] == "mongodb://mongo-1:27017,mongo-2:27017,mongo-3:27017/?replicaSet=rs1"
        assert env["MERGETAG_ESPS"] == "mailchimp,klaviyo,sendgrid"  # the rest of the settings carried over
    assert [services[n]["command"][1] for n in ("worker-1", "worker-2", "sync-1", "sync-2")] == ["worker", "worker", "sync", "sync"]
    assert "receiver-1:8080" in services["receivers"]["environment"]["NGINX_CONF"]


def test_the_observability_profile_scrapes_every_process_into_a_provisioned_dashboard(compose):
    """Prometheus scrapes each process where it serves /metrics, and every series the dashboard
    queries is one mergetag exports."""
    import json
    import re

    from adapters.metrics import Metrics
    from adapters.settings import Settings

    result = subprocess.run([compose, "-f", "docker-compose.yml", "--profile", "observability", "config"], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    services = yaml.safe_load(result.stdout)["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert os.path.exists(os.path.join(ROOT, source)), source

    scrape = yaml.safe_load((ROOT / "observability/prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in scrape}
    defaults = Settings.model_fields
    assert targets == {"receiver": "receiver:8080", "admin": "admin:8083", "feed": f"feed:{defaults['feed_port'].default}",
                       "worker": f"worker:{defaults['worker_metrics_port'].default}", "sync": f"sync:{defaults['sync_metrics_port'].default}"}
    for job in ("receiver", "admin", "feed"):  # they serve /metrics on their own HTTP port
        command = services[job]["command"]
        assert command[command.index("--port") + 1] == targets[job].split(":")[1]
    assert set(targets) <= set(services)

    exported = {sample for family in Metrics().registry.collect() for sample in
                {family.name, f"{family.name}_total", f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}}
    dashboard = json.loads((ROOT / "observability/grafana/mergetag.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel["targets"] for name in re.findall(r"mergetag_[a-z_]+", t["expr"])}
    assert queried and queried <= exported, queried - exported
