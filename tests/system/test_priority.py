"""After an outage of the sync, a consent change goes ahead of the bulk backlog."""

import uuid

from tests.conftest import eventually, own_pipeline, post_webhook
from tests.support.samples import customer


async def test_consent_changes_drain_before_the_bulk_backlog(rabbitmq, mongo_uri, sandbox, http, tmp_path):
    # The worker merges, but the sync is down: an outage.
    async with own_pipeline(mongo_uri, sandbox, tmp_path, MERGETAG_WORKER_THREADS="1", MERGETAG_SYNC_GRACE_S="30") as pipeline:
        emails = [f"bulk{n}-{uuid.uuid4().hex[:6]}@example.com" for n in range(25)]
        for email in emails:
            assert (await post_webhook(http, pipeline.url, "customers/create", customer(email))).status == 202
        urgent = emails[-1]
        unsubscribe = {"customer_id": 1, "email_address": urgent,
                       "email_marketing_consent": {"state": "unsubscribed", "consent_updated_at": "2030-01-01T00:00:00Z"}}
        assert (await post_webhook(http, pipeline.url, "customers_email_marketing_consent/update", unsubscribe)).status == 202

        async def merged():
            doc = await pipeline.db.profiles.find_one({"email": urgent})
            return doc and doc["consent"].get("email", {}).get("state") == "unsubscribed"

        await eventually(merged, timeout=60)
        before = len(await sandbox.control(http, "history"))
        pipeline.start_sync()  # the sync comes back to a backlog

        async def drained():
            history = (await sandbox.control(http, "history"))[before:]
            firsts = []
            for _, email, _ in history:
                if email in emails and email not in firsts:
                    firsts.append(email)
            return firsts if len(firsts) == len(emails) else None

        order = await eventually(drained, timeout=60)
        assert order.index(urgent) <= 2, order[:5]  # ahead of 24 bulk updates queued before it
        assert (await sandbox.member(http, urgent))["status"] == "unsubscribed"
