"""The served OpenAPI document is true to the routes, and fuzzing the receiver from it never
produces a 5xx or an unhandled exception."""

import os
import subprocess
import sys
import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from adapters.http.receiver import create_app
from adapters.settings import Settings
from broker import admin
from sandboxes.local import free_port, wait_for_port
from tests.conftest import AMQP_URL, ROOT, source_env


async def test_document_lists_exactly_the_routes(receiver, http):
    async with http.get(f"{receiver}/openapi.json") as r:
        document = await r.json()
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    app = create_app(Settings(), sources={})
    routed = {(route.method, route.resource.canonical) for route in app.router.routes() if route.method != "HEAD"}
    assert documented == routed
    assert set(document["paths"]["/webhooks/{source}"]["post"]["parameters"][0]["schema"]["enum"]) >= {
        "shopify", "tracking", "sendgrid", "mailchimp", "crm", "billing", "legacy"}


@pytest.fixture(scope="module")
def live_receiver(rabbitmq):
    """The receiver as its own process, on queues nobody consumes (fuzzed input must not reach workers)."""
    prefix = "f" + uuid.uuid4().hex[:10]
    port = free_port()
    env = {**os.environ, **source_env(), "MERGETAG_QUEUE_PREFIX": prefix, "MERGETAG_AMQP_URL": AMQP_URL,
           "MERGETAG_SHOPIFY_SECRETS": "fuzz", "MERGETAG_LOG_LEVEL": "INFO"}
    process = subprocess.Popen([sys.executable, "-m", "adapters.cli", "receiver", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process=process)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    admin.drop_queues(AMQP_URL, prefix)


def test_fuzzing_from_the_document_never_gives_a_5xx(live_receiver):
    schema = schemathesis.openapi.from_dict(requests.get(f"{live_receiver}/openapi.json", timeout=5).json())
    failures = []

    for operation in schema.get_all_operations():
        op = operation.ok()
        strategy = op.as_strategy()

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(strategy)
        def check(case):
            response = case.call(base_url=live_receiver, timeout=10)
            if response.status_code >= 500:
                failures.append((op.label, response.status_code, response.text[:200]))

        check()
    assert failures == []
