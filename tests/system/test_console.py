"""The operator's console in a real headless browser (Debian's Chromium driven by Playwright): sign in,
find a dead letter a real failing event made, read the replay plan and its diff, fix the cause, replay,
see the member at the sandbox and the action in the audit log. A ``read`` token cannot replay.
Screenshots of every page go to ``.local/console-screenshots/``."""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import uuid

import aiohttp
import pytest

from adapters.store.quarantine import Quarantine
from broker.dead_letters import DeadLetters
from sandboxes.local import free_port, wait_for_port
from tests.conftest import (
    API_KEY,
    HMAC_SECRET,
    MERGE_FIELDS,
    ROOT,
    eventually,
    own_pipeline,
    post_webhook,
    spawn,
    start_mailchimp,
    stop,
    stop_sandbox,
)
from tests.support.samples import customer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKENS = {"ops": {"token": "ops-console-token", "scopes": ["read", "operate"]}, "viewer": {"token": "viewer-console-token", "scopes": ["read"]},
          "dpo": {"token": "dpo-console-token", "scopes": ["read", "erase"]}}
SHOTS = ROOT / ".local" / "console-screenshots"


@pytest.fixture
def browser_path() -> str:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is required in CI (.ci/run installs it)")
        pytest.skip("chromium (Debian package) not installed")
    return CHROMIUM


async def sign_in(browser, base: str, token: str):
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(f"{base}/console")
    assert page.url.endswith("/console/login")  # not signed in: the login page
    await page.fill("#token", token)
    await page.click("#sign-in")
    await page.wait_for_url(f"{base}/console")
    return context, page


async def test_an_operator_plans_and_replays_a_dead_letter_in_the_browser(mongo_uri, tmp_path, http, browser_path):
    from playwright.async_api import async_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    sandbox = start_mailchimp()  # of its own: without the CITY merge field, so a member with a city is refused
    admin = None
    try:
        async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_RETRY_MAX="1", MERGETAG_RETRY_MIN_BACKOFF_MS="100",
                                MERGETAG_SYNC_GRACE_S="1", MERGETAG_SYNC_SWEEP_INTERVAL_S="0.5",
                                MERGETAG_MERGE_FIELDS=json.dumps(MERGE_FIELDS)) as pipeline:
            pipeline.start_sync()
            port = free_port()
            admin = spawn({**pipeline.env, "MERGETAG_ADMIN_TOKENS": json.dumps(TOKENS)}, tmp_path / "admin.log", "admin", "--port", str(port))
            await asyncio.to_thread(wait_for_port, port, timeout=90, process=admin)
            base = f"http://127.0.0.1:{port}"

            email = f"console-{uuid.uuid4().hex[:10]}@example.com"
            event = customer(email, first_name="Cy", default_address={"city": "Ottawa", "country_code": "CA"})
            assert (await post_webhook(http, pipeline.url, "customers/update", event)).status == 202
            tools = DeadLetters(pipeline.env["MERGETAG_AMQP_URL"], pipeline.env["MERGETAG_QUEUE_PREFIX"])

            async def refused():
                return [d for d in await asyncio.to_thread(tools.list) if d.code == "esp_rejected"]

            (letter,) = await eventually(refused, timeout=90)
            profile_id = letter.sync_target()["profile_id"]

            async with aiohttp.ClientSession() as anonymous:
                async with anonymous.get(f"{base}/console", allow_redirects=False) as r:
                    assert r.status == 303 and r.headers["Location"] == "/console/login"

            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
                context, page = await sign_in(browser, base, TOKENS["ops"]["token"])
                assert await page.text_content("#who") == "ops"
                cookie = next(c for c in await context.cookies() if c["name"] == "mergetag_console")
                assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
                assert "esp_rejected" in await page.text_content("#dead-letters")
                fresh = customer(f"rate-{uuid.uuid4().hex[:8]}@example.com")
                assert (await post_webhook(http, pipeline.url, "customers/update", fresh)).status == 202

                async def rate_shown():  # the events accepted per second, by source, over the last minute
                    await page.reload()
                    return await page.locator('#rates td:text-is("shopify")').count() == 1

                await eventually(rate_shown, timeout=30)
                await page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)

                await page.goto(f"{base}/console/dead-letters?reason=esp_rejected")
                assert await page.locator(f'tr.letter[data-id="{letter.message_id}"]').count() == 1
                assert email not in await page.content()
                await page.screenshot(path=str(SHOTS / "dead-letters.png"), full_page=True)
                await page.click(f'tr.letter[data-id="{letter.message_id}"] a')
                assert "esp_rejected" in await page.text_content("#letter") and await page.locator("#payload-masked").count() == 1
                await page.screenshot(path=str(SHOTS / "dead-letter.png"), full_page=True)
                await page.go_back()

                await page.click("#plan")
                await page.wait_for_url("**/console/dead-letters/plan*")
                assert profile_id in await page.text_content("#profiles")
                city = page.locator('table.diff[data-target="mailchimp"] tr.change[data-field="CITY"] td')
                assert [await city.nth(i).text_content() for i in range(4)] == [profile_id, "CITY", "—", "•••"]  # masked: no erase scope
                assert "Ottawa" not in await page.content() and email not in await page.content()
                await page.screenshot(path=str(SHOTS / "plan.png"), full_page=True)
                assert await asyncio.to_thread(tools.list) != []  # a dry run replays nothing

                # The fix: the audience gets the merge field. Then replay at 5 per second.
                async with http.post(f"{sandbox.api}/lists/sandbox/merge-fields", json={"name": "City", "tag": "CITY", "type": "text"},
                                     headers={"Authorization": aiohttp.encode_basic_auth("t", API_KEY)}) as r:
                    assert r.status == 200
                await page.fill("#rate", "5")
                await page.click("#replay")
                await page.wait_for_url("**/console/replays/*")
                await page.wait_for_function("document.querySelector('#status').textContent === 'finished'", timeout=60_000)
                assert await page.text_content("#progress") == "1 of 1"
                await page.screenshot(path=str(SHOTS / "replay.png"), full_page=True)

                async def city_synced():
                    member = await sandbox.member(http, email)
                    return member if member and member["merge_fields"].get("CITY") == "Ottawa" else None

                await eventually(city_synced, timeout=60)

                await page.goto(f"{base}/console/audit")
                entry = page.locator('tr.entry[data-action="dead_letters.replay"]').first
                cells = [await entry.locator("td").nth(i).text_content() for i in range(6)]
                assert cells[1] == "ops" and cells[5] == "finished" and '"replayed": 1' in cells[4]
                await page.screenshot(path=str(SHOTS / "audit.png"), full_page=True)

                # The person's profile: traits with their lineage (values masked), sync state per target.
                await page.goto(f"{base}/console/profiles")
                await page.fill("#ref", email)
                await page.click("#find")
                await page.wait_for_url(f"**/console/profiles/{profile_id}")
                first_name = page.locator('tr.trait[data-trait="first_name"] td')
                assert [await first_name.nth(i).text_content() for i in (1, 2)] == ["•••", "shopify"]
                assert await page.locator('#sync tr.target[data-target="mailchimp"]').count() == 1
                assert email not in await page.content()
                await page.screenshot(path=str(SHOTS / "profile.png"), full_page=True)

                # Its event trail: merged into version 1, refused by the ESP, synced after the replay; then one
                # event's: its delivery queued, merged, and the sends that followed.
                await page.click("#trail-link")
                stages = [await row.get_attribute("data-stage") for row in await page.locator("tr.step").all()]
                assert stages[0] == "merged" and "refused" in stages and stages.index("synced") > stages.index("refused"), stages
                assert "version 1" in await page.text_content("#trail") and "first_name" in await page.text_content("#trail")
                await page.locator("a.event").first.click()
                await page.wait_for_url("**/console/trail?event=*")
                stages = [await row.get_attribute("data-stage") for row in await page.locator("tr.step").all()]
                assert stages[:2] == ["queued", "merged"] and "synced" in stages, stages
                assert email not in await page.content()
                await page.screenshot(path=str(SHOTS / "trail.png"), full_page=True)

                # A delivery that fails validation, in quarantine with its reason, then redriven.
                body = json.dumps({"kind": "purchase", "uid": f"P-{uuid.uuid4().hex[:8]}", "at": "2025-04-01T09:30:00Z",
                                   "amount_cents": 10**28, "buyer": {"email": email}}).encode()
                signature = "sha256=" + base64.b64encode(hmac.new(HMAC_SECRET.encode(), body, hashlib.sha256).digest()).decode()
                async with http.post(f"{pipeline.url}/webhooks/legacy", data=body, headers={"X-Legacy-Signature": signature}) as r:
                    assert r.status == 202

                async def listed():
                    # The counts and the list are two reads: a delivery quarantined between them is in one only.
                    await page.goto(f"{base}/console/quarantine")
                    return (await page.locator("tr.quarantined").count() == 1
                            and "order.completed:order.completed.total:less_than_equal" in await page.text_content("#reasons"))

                await eventually(listed, timeout=60)
                await page.screenshot(path=str(SHOTS / "quarantine.png"), full_page=True)
                # The redrive's plan validates again first: unfixed, it would come back to quarantine.
                await page.click("#plan-redrive")
                await page.wait_for_url("**/console/quarantine/plan*")
                assert [await page.text_content(f"#plan-{n}") for n in ("deliveries", "passing", "failing")] == ["1", "0", "1"]
                assert "order.completed:order.completed.total:less_than_equal" in await page.text_content("#still-failing")
                await page.screenshot(path=str(SHOTS / "redrive-plan.png"), full_page=True)
                await page.fill("#rate", "2")
                await page.click("#redrive")
                await page.wait_for_url("**/console/replays/*")
                await page.wait_for_function("document.querySelector('#status').textContent === 'finished'", timeout=60_000)
                assert await page.text_content("#progress") == "1 of 1"
                quarantine = Quarantine(pipeline.db.client, pipeline.db.name)

                async def back_in_quarantine():
                    (doc,) = await quarantine.list(limit=10)
                    return doc["status"] == "quarantined" and doc["attempts"] == 2

                await eventually(back_in_quarantine, timeout=60)  # the merge refused it again, with the same reason
                await page.goto(f"{base}/console/audit")
                entry = page.locator('tr.entry[data-action="quarantine.redrive"]').first
                assert await entry.locator("td").nth(5).text_content() == "finished"

                await page.goto(f"{base}/console/erasures")
                assert await page.locator("#erase").count() == 0  # ops may not erase
                await page.screenshot(path=str(SHOTS / "erasures.png"), full_page=True)

                # A read token sees the plan but cannot replay, in the page or behind it.
                viewer, vpage = await sign_in(browser, base, TOKENS["viewer"]["token"])
                await vpage.goto(f"{base}/console/dead-letters/plan?reason=esp_rejected")
                assert await vpage.locator("#read-only").count() == 1 and await vpage.locator("#replay").count() == 0
                csrf = await vpage.get_attribute('header input[name="csrf"]', "value")
                status = await vpage.evaluate("""async ([csrf, id]) => (await fetch('/console/dead-letters/replay', {method: 'POST',
                    body: new URLSearchParams({csrf, ids: id, rate: '5'})})).status""", [csrf, letter.message_id])
                assert status == 403
                forged = await vpage.evaluate("""async (id) => (await fetch('/console/dead-letters/replay', {method: 'POST',
                    body: new URLSearchParams({csrf: 'forged', ids: id, rate: '5'})})).status""", letter.message_id)
                assert forged == 403

                # An erase token requests an erasure and follows its receipt until every target verified it.
                _, dpage = await sign_in(browser, base, TOKENS["dpo"]["token"])
                await dpage.goto(f"{base}/console/erasures")
                await dpage.fill("#erase-emails", email)
                await dpage.click("#erase")
                await dpage.wait_for_url(f"{base}/console/erasures")

                async def verified():
                    await dpage.goto(f"{base}/console/erasures")
                    row = dpage.locator("tr.receipt").first
                    return await row.count() == 1 and "completed" in await row.text_content()

                await eventually(verified, timeout=90)
                assert "mailchimp: verified" in await dpage.locator("tr.receipt").first.text_content()
                assert await sandbox.member(http, email) is None
                await dpage.screenshot(path=str(SHOTS / "erasure.png"), full_page=True)
                await dpage.goto(f"{base}/console/audit")
                assert await dpage.locator('tr.entry[data-action="erasure.request"]').count() == 1
                await browser.close()
    finally:
        if admin is not None:
            stop([admin])
        stop_sandbox(sandbox)
