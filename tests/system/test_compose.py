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
                        "receiver", "worker", "sync", "poller", "admin"}


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
