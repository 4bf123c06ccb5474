"""Preview: exactly what the sync would send, and a template rendered with it (CLI and admin API)."""

import asyncio
import json
import os
import subprocess
import sys
import uuid
from unittest import mock

from aiohttp.test_utils import TestServer

from adapters.http.admin import create_admin_app
from adapters.settings import Settings
from sandboxes.local import free_port
from tests.conftest import ROOT, eventually, post_webhook
from tests.support.samples import customer


async def admin_api(system) -> tuple[TestServer, str]:
    """The admin API on the system's settings, token ``admin-secret``."""
    with mock.patch.dict(os.environ, {**system.env, "MERGETAG_ADMIN_TOKEN": "admin-secret"}, clear=True):
        app = create_admin_app(Settings())
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server, str(server.make_url("")).rstrip("/")


TEMPLATE = "*|IF:FNAME|*Hi *|FNAME|**|ELSE:|*Hi there*|END:IF|*, you are *|TIER|*."


async def test_preview_cli_and_admin_api(receiver, system, sandbox, http, tmp_path):
    email = f"preview-{uuid.uuid4().hex[:8]}@example.com"
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Pia"))).status == 202
    await eventually(lambda: sandbox.member(http, email))

    async def synced():
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc and not doc["esp"]["mailchimp"]["pending"] else None

    await eventually(synced)
    template = tmp_path / "welcome.txt"
    template.write_text(TEMPLATE)
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "preview", email, "--template", str(template)],
                                  cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60, check=True)
    shown = json.loads(out.stdout)
    assert shown["member"]["merge_fields"]["FNAME"] == "Pia"
    assert shown["rendered"] == "Hi Pia, you are bronze."
    assert shown["would_send"] is False  # the ESP already holds exactly this

    server, base = await admin_api(system)
    try:
        async with http.get(f"{base}/admin/preview/{email}") as r:
            assert r.status == 401
        headers = {"Authorization": "Bearer admin-secret"}
        async with http.post(f"{base}/admin/preview/{email}", data="*|FNAME|* *|IFNOT:LNAME|*?*|END:IF|*", headers=headers) as r:
            body = await r.json()
        assert r.status == 200 and body["rendered"] == "Pia " and body["member"]["email_address"] == email
        async with http.post(f"{base}/admin/preview/{email}", data="*|IF:FNAME|*", headers=headers) as r:
            assert (r.status, (await r.json())["error"]) == (400, "invalid_template")
        async with http.get(f"{base}/admin/profiles/{email.upper()}", headers=headers) as r:
            assert (await r.json())["traits"]["first_name"]["source"] == "shopify"
        async with http.get(f"{base}/admin/preview/nobody@example.com", headers=headers) as r:
            assert r.status == 404
    finally:
        await server.close()


async def test_scenarios_before_a_campaign_from_the_cli_and_the_admin_api(system, http, tmp_path):
    template = tmp_path / "campaign.txt"
    template.write_text("*|IF:FNAME|*Hi *|FNAME|**|ELSE:|*Hi there*|END:IF|* *|LNAME|*, your cart: *|CARTURL|*")
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "adapters.cli", "preview", "--scenarios", "--template", str(template)],
                                  cwd=ROOT, env=system.env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr  # something breaks: the exit code says so
    shown = json.loads(out.stdout)
    assert shown["problems"]["FNAME"] == {"fell_back": ["missing_first_name"], "overflow": ["very_long_values"]}
    assert "abandoned_cart" not in shown["problems"]["CARTURL"]["empty"] and "zero_orders" in shown["problems"]["CARTURL"]["empty"]
    far = next(s for s in shown["scenarios"] if s["scenario"] == "far_time_zone")
    assert far["rendered"].startswith("Hi Tane")

    server, base = await admin_api(system)
    headers = {"Authorization": "Bearer admin-secret"}
    try:
        async with http.post(f"{base}/admin/preview-scenarios?esp=klaviyo", data="{{ first_name }} *|first_name|*", headers=headers) as r:
            body = await r.json()
        assert r.status == 200 and body["esp"] == "klaviyo"
        assert "missing_first_name" in body["problems"]["first_name"]["empty"]
        async with http.post(f"{base}/admin/preview-scenarios", data="*|IF:FNAME|*", headers=headers) as r:
            assert (r.status, (await r.json())["error"]) == (400, "invalid_template")
        async with http.post(f"{base}/admin/preview-scenarios", data="x") as r:
            assert r.status == 401
    finally:
        await server.close()
