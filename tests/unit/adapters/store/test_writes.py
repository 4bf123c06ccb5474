"""The profile write is pure: what it sets is exactly what changed since the version it read."""

from adapters.store.writes import Save, profile_write
from schemas.profile import Profile
from schemas.sync import Stored

KEYS = ["k1", "k2"]


def stored(member_hash: str, sent_hash: str | None = None) -> Stored:
    return Stored(version=3, esp={"mailchimp": {"member": {"m": 1}, "member_hash": member_hash, "sent_hash": sent_hash}})


def test_a_new_profile_is_one_insert_with_its_sync_state_pending():
    profile = Profile(id="p1", email="a@example.com", categories_viewed=("shoes",))
    guard, doc = profile_write(Save(profile, None, {"mailchimp": ({"m": 1}, "h1")}), KEYS, "tok")
    assert guard is None
    assert doc["_id"] == "p1" and doc["version"] == 1 and doc["keys"] == KEYS and doc["written_by"] == "tok"
    assert doc["esp"]["mailchimp"]["pending"] is True and doc["esp"]["mailchimp"]["member_hash"] == "h1"


def test_an_update_sets_only_the_fields_that_changed_and_the_member_only_when_its_hash_did():
    before = Profile(id="p1", email="a@example.com", categories_viewed=("shoes",), first_seen=None)
    after = before.model_copy(update={"categories_viewed": ("hats", "shoes")})
    guard, update = profile_write(Save(after, 3, {"mailchimp": ({"m": 1}, "h1")}, stored=stored("h1", "h1"), before=before), KEYS)
    assert guard == {"_id": "p1", "version": 3}
    assert update["$inc"] == {"version": 1}
    assert set(update["$set"]) == {"categories_viewed", "keys"}  # no member (same hash), nothing pending (the ESP holds it)

    changed = after.model_copy(update={"email": "b@example.com"})
    _, update = profile_write(Save(changed, 3, {"mailchimp": ({"m": 2}, "h2")}, stored=stored("h1", "h1"), before=before), KEYS)
    assert {"categories_viewed", "email", "keys", "esp.mailchimp.member", "esp.mailchimp.member_hash", "esp.mailchimp.dirty_at",
            "esp.mailchimp.pending"} == set(update["$set"])
    assert update["$set"]["esp.mailchimp.member"] == {"m": 2}


def test_without_the_profile_read_every_field_is_written():
    profile = Profile(id="p1", email="a@example.com", categories_viewed=("shoes",))
    _, update = profile_write(Save(profile, 3, {"mailchimp": ({"m": 1}, "h1")}, stored=stored("h1", "h1")), KEYS)
    assert set(profile.model_dump(exclude={"id"})) | {"keys", "esp.mailchimp.member", "esp.mailchimp.member_hash"} == set(update["$set"])


def test_a_field_cleared_since_is_written_as_cleared():
    before = Profile(id="p1", email="a@example.com", categories_viewed=("shoes",))
    after = before.model_copy(update={"categories_viewed": ()})
    _, update = profile_write(Save(after, 3, {}, stored=stored("h1"), before=before), KEYS)
    assert update["$set"]["categories_viewed"] == ()
