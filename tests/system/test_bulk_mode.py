"""Efficient when heavy: a backlog past MERGETAG_SYNC_BULK_BACKLOG goes out in bulk requests, not one by one."""

import uuid

from tests.conftest import eventually, own_pipeline, post_webhook
from tests.support.samples import customer


async def test_a_backlog_goes_in_bulk(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    # The worker merges while the sync is down: a backlog builds.
    async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_SYNC_BULK_BACKLOG="10",
                            MERGETAG_SYNC_SWEEP_INTERVAL_S="0.5") as pipeline:
        emails = [f"heavy{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(60)]
        for email in emails:
            assert (await post_webhook(http, pipeline.url, "customers/create", customer(email, first_name="Heavy"))).status == 202

        async def pending(flag: bool):
            return await pipeline.db.profiles.count_documents({"email": {"$in": emails}, "esp.mailchimp.pending": flag}) == len(emails)

        await eventually(lambda: pending(True), timeout=60)
        await sandbox.control(http, "stats/reset", {})
        pipeline.start_sync()  # 60 queued syncs meet a backlog past the threshold
        await eventually(lambda: pending(False), timeout=60)

        members = [await sandbox.member(http, e) for e in emails]
        assert all(m and m["merge_fields"]["FNAME"] == "Heavy" for m in members)
        requests = (await sandbox.control(http, "stats"))["requests"]
        bulk, single = requests.get("POST /3.0/batches", 0), requests.get("PUT /3.0/lists/{list_id}/members/{hash}", 0)
        # Singles only until the sync has counted the backlog (once a second per process); the rest in bulk.
        assert bulk >= 1 and single + bulk < len(emails) // 2, requests
