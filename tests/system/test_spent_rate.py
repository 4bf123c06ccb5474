"""A target whose single writes' rate is spent goes in bulk jobs: the real sync, the Klaviyo sandbox
enforcing a single-import limit of 8 a minute, and profiles too few for the sweeper's bulk path."""

import json
import uuid

from tests.conftest import KLAVIYO_FIELDS, KLAVIYO_KEY, eventually, own_pipeline, post_webhook, start_sandbox, stop_sandbox
from tests.support.samples import customer

SINGLES_PER_MINUTE = 8
IMPORTS = "POST /api/profile-import"
JOBS = "POST /api/profile-bulk-import-jobs"


async def test_changes_past_the_single_import_rate_reach_klaviyo_in_jobs_not_after_the_rate_comes_back(rabbitmq, mongo_uri, http, tmp_path):
    klaviyo = start_sandbox("klaviyo", "--api-key", KLAVIYO_KEY, "--job-delay-ms", "200", "--import-limits", f"75,{SINGLES_PER_MINUTE}")
    esp_file = tmp_path / "esps.json"
    esp_file.write_text(json.dumps({"klaviyo": {
        "kind": "klaviyo", "base_url": klaviyo.url, "api_key_env": "TEST_KLAVIYO_KEY", "fields": KLAVIYO_FIELDS, "job_timeout_s": 30,
        "rates": {"import": [[75, 1.0], [SINGLES_PER_MINUTE, 60.0]], "bulk": [[10, 1.0], [150, 60.0]], "default": [[10, 1.0], [150, 60.0]]},
    }}))
    try:
        async with own_pipeline(mongo_uri, None, tmp_path, MERGETAG_ESP_FILE=str(esp_file), TEST_KLAVIYO_KEY=KLAVIYO_KEY) as pipeline:
            pipeline.start_sync()
            # Fewer than the 20 pending that make a sync take the others along in bulk, or the sweeper send in bulk:
            # only the rounds' spill can carry more than the minute's single imports.
            emails = [f"spent{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(14)]
            for email in emails:
                assert (await post_webhook(http, pipeline.url, "customers/create", customer(email, first_name="Spent"))).status == 202

            async def all_held():
                held = {row.get("email"): row for row in await klaviyo.control(http, "profiles")}
                return held if all(held.get(e, {}).get("first_name") == "Spent" for e in emails) else None

            await eventually(all_held, timeout=120)
            stats = await klaviyo.control(http, "stats")
            requests = stats["requests"]
            # Every profile is there while no more single imports than the minute allows were made: the rest went in
            # jobs at once (waiting for the rate would have taken more than a minute, and as many single imports).
            assert requests.get(IMPORTS, 0) <= SINGLES_PER_MINUTE and requests.get(JOBS, 0) >= 1, requests
            assert stats["rate_limits"][IMPORTS]["throttled"] == 0  # the guard kept to the limit: no 429

            async def settled():
                return await pipeline.db.profiles.count_documents({"email": {"$in": emails}, "esp.klaviyo.pending": False}) == len(emails)

            await eventually(settled, timeout=60)
    finally:
        stop_sandbox(klaviyo)
