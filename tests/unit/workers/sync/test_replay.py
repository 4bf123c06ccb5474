"""The replay plan and its diff: pure."""

import dramatiq

from adapters.esps.base import Held
from broker import topology
from broker.dead_letters import DeadLetter
from workers.sync.replay import Plan, changes, mask, plan, summary


def letter(actor: str, code: str, *args) -> DeadLetter:
    message = dramatiq.Message(queue_name="q.sync", actor_name=actor, args=args, kwargs={}, options={})
    return DeadLetter("q.sync", message.message_id, actor, code, "detail", 0, None, message)


def test_a_plan_counts_letters_by_actor_and_reason_and_names_their_profiles():
    letters = [letter(topology.SYNC_PROFILE_ACTOR, "esp_rejected", "p_1", "mailchimp"),
               letter(topology.SYNC_PROFILE_ACTOR, "esp_rejected", "p_2", "klaviyo"),
               letter(topology.PROCESS_EVENT_ACTOR, "unexpected_error", {"delivery": 1})]
    found = plan(letters)
    assert found.letters == 3 and found.profiles == ["p_1", "p_2"]
    assert found.by_actor_reason == [("process_event", "unexpected_error", 1), ("sync_profile", "esp_rejected", 2)]


def test_changes_are_the_fields_the_target_does_not_hold_yet():
    held = Held(fields={"FNAME": "Cy", "CITY": "", "LTV": 10.0}, unsubscribed=False)
    found = changes("p_1", {"FNAME": "Cy", "CITY": "Ottawa", "LTV": 12.5, "PHONE": ""}, held)
    assert [(c.tag, c.held, c.sent) for c in found] == [("CITY", "", "Ottawa"), ("LTV", 10.0, 12.5)]
    assert [c.tag for c in changes("p_1", {"FNAME": "Cy", "PHONE": ""}, None)] == ["FNAME"]  # no contact yet


def test_values_are_masked_unless_the_reader_may_see_personal_data():
    assert [mask(v) for v in ("Ottawa", 12.5, None, "")] == ["•••", "•••(number)", "—", "—"]
    found = Plan(1, [], ["p_1"], {"mailchimp": changes("p_1", {"CITY": "Ottawa"}, None)})
    assert summary(found, personal=False)["targets"]["mailchimp"] == [{"profile_id": "p_1", "field": "CITY", "held": "—", "sent": "•••"}]
    assert summary(found, personal=True)["targets"]["mailchimp"][0]["sent"] == "Ottawa"
