"""Reconciliation finds members changed behind mergetag's back, and repair puts them right."""

import asyncio
import json
import subprocess
import sys
import uuid

import aiohttp

from adapters.esps.base import Held
from adapters.esps.mailchimp.member import subscriber_hash
from tests.conftest import API_KEY, ROOT, eventually, post_webhook
from tests.support.samples import customer
from workers.sync.reconcile import compare


def test_compare_reports_fields_missing_members_and_consent():
    sent = {"FNAME": "Ann", "LTV": 5.0, "CARTURL": ""}
    assert compare("p", sent, True, Held({"FNAME": "Ann", "LTV": 5.0, "OTHER": 1}, unsubscribed=True)) is None
    drift = compare("p", sent, True, Held({"FNAME": "Anna", "LTV": 5.0, "CARTURL": "https://x"}, unsubscribed=False))
    assert drift.summary() == {"profile_id": "p", "missing": False, "fields": ["CARTURL", "FNAME"], "unsubscribe_lost": True}
    assert compare("p", sent, False, None).missing


async def test_reconcile_reports_drift_and_repairs_it(receiver, system, sandbox, http):
    email = f"drift-{uuid.uuid4().hex[:8]}@example.com"
    assert (await post_webhook(http, receiver, "customers/create", customer(email, first_name="Dora"))).status == 202

    async def synced():
        doc = await system.db.profiles.find_one({"email": email})
        return doc if doc and doc["esp"]["mailchimp"].get("sent_hash") and not doc["esp"]["mailchimp"]["pending"] else None

    await eventually(synced)
    # Someone edits the member in Mailchimp directly.
    async with http.put(f"{sandbox.api}/lists/sandbox/members/{subscriber_hash(email)}",
                        json={"email_address": email, "merge_fields": {"FNAME": "Dorothy"}},
                        headers={"Authorization": aiohttp.encode_basic_auth("x", API_KEY)}) as r:
        assert r.status == 200

    def reconcile(*flags):
        out = subprocess.run([sys.executable, "-m", "adapters.cli", "reconcile", "--all", "--esp", "mailchimp", *flags], cwd=ROOT, env=system.env,
                             capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout)

    report = (await asyncio.to_thread(reconcile))["mailchimp"]
    mine = [d for d in report["drift"] if d["fields"] == ["FNAME"]]
    assert mine and report["repaired"] == 0
    repaired = (await asyncio.to_thread(reconcile, "--repair"))["mailchimp"]
    assert repaired["repaired"] >= 1

    async def restored():
        m = await sandbox.member(http, email)
        return m if m["merge_fields"]["FNAME"] == "Dora" else None

    await eventually(restored)
