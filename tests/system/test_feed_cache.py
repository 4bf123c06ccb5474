"""The feed cache's ordering rules on the real Redis: a fence before every write, fills guarded by
version, pointers checked against the profile they point at."""

import uuid

import pytest

from adapters.redis.feed_cache import ERASED, HIT, MISS, NO_MEMBER, OVER_RATE, Entry, FeedCache

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def cache():
    c = FeedCache(REDIS, "fc" + uuid.uuid4().hex[:8], ttl_s=60)
    yield c
    await c.close()


def entry(pid: str, version: int, first_name: str, keys=("h:ada",)) -> Entry:
    return Entry(pid, version, keys, {"mailchimp": (b'{"FNAME":"' + first_name.encode() + b'"}', f"hash-{version}")})


async def test_a_written_entry_is_read_by_key_and_by_id_in_one_round_trip(cache):
    assert await cache.put([entry("p_1", 1, "Ada")]) == [True]
    for found in (await cache.read("mailchimp", key="h:ada"), await cache.read("mailchimp", profile_id="p_1")):
        assert (found.status, found.fields, found.hash) == (HIT, b'{"FNAME":"Ada"}', "hash-1")
    assert (await cache.read("klaviyo", key="h:ada")).status == NO_MEMBER
    assert (await cache.read("mailchimp", key="h:nobody")).status == MISS


async def test_between_the_fence_and_the_write_reads_miss_and_an_older_fill_is_refused(cache):
    await cache.put([entry("p_1", 1, "Ada")])
    await cache.invalidate({"p_1": 2})  # a merge is about to write version 2
    assert (await cache.read("mailchimp", key="h:ada")).status == MISS
    # A reader that read version 1 from the store before the write committed fills late: refused.
    assert await cache.put([entry("p_1", 1, "Ada")]) == [False]
    assert (await cache.read("mailchimp", key="h:ada")).status == MISS
    assert await cache.put([entry("p_1", 2, "Ava")]) == [True]  # the writer, after the store write
    assert (await cache.read("mailchimp", key="h:ada")).fields == b'{"FNAME":"Ava"}'
    # The fence is lifted: and still nothing older than what is held goes in.
    assert await cache.put([entry("p_1", 1, "Ada")]) == [False]
    assert (await cache.read("mailchimp", profile_id="p_1")).hash == "hash-2"


async def test_a_pointer_to_a_profile_that_gave_the_key_up_is_not_followed(cache):
    await cache.put([entry("p_1", 1, "Ada", keys=("h:shared",))])
    # The address moved to another person's profile: p_1's next version no longer holds it.
    await cache.put([entry("p_1", 2, "Ada", keys=("h:other",))])
    await cache.put([entry("p_2", 1, "Bo", keys=())])  # p_2 written without refreshing the pointer
    assert (await cache.read("mailchimp", key="h:shared")).status == MISS  # never p_1's data for it


async def test_an_erased_profile_reads_as_erased_by_every_key_it_held(cache):
    await cache.put([entry("p_1", 1, "Ada", keys=("h:ada", "h:phone"))])
    await cache.invalidate({"p_1": 2})
    await cache.put([Entry("p_1", 2, ("h:ada", "h:phone"), {}, gone=True)])
    for key in ("h:ada", "h:phone"):
        assert (await cache.read("mailchimp", key=key)).status == ERASED
    assert (await cache.read("mailchimp", profile_id="p_1")).status == ERASED


async def test_reads_count_against_their_tokens_rate(cache):
    got = [(await cache.read("mailchimp", profile_id="p_x", rate=("t", 3), second=42)).status for _ in range(5)]
    assert got == [MISS, MISS, MISS, OVER_RATE, OVER_RATE]
    assert (await cache.read("mailchimp", profile_id="p_x", rate=("t", 3), second=43)).status == MISS  # the next second
    assert (await cache.read("mailchimp", profile_id="p_x", rate=("other", 3), second=42)).status == MISS
