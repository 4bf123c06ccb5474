"""The OpenAPI request checker catches what the vendors would reject, and the trimmed specs stay faithful."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.specs import trim
from tests.support.openapi_check import check_recorded, check_request, load_spec, spec_path

ORIGINALS = Path("/work/shared/specs")

KLAVIYO_HEADERS = {
    "Authorization": "Klaviyo-API-Key",
    "revision": "2026-07-15",
    "Content-Type": "application/vnd.api+json",
    "Accept": "application/vnd.api+json",
}
SENDGRID_HEADERS = {"Authorization": "Bearer", "Content-Type": "application/json"}

PROFILE_IMPORT = {
    "data": {
        "type": "profile",
        "attributes": {
            "email": "ada@example.com",
            "external_id": "cus_1001",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "location": {"city": "London", "country": "United Kingdom"},
            "properties": {"favorite_category": "books", "lifetime_value": 412.5},
        },
    }
}

BULK_IMPORT_JOB = {
    "data": {
        "type": "profile-bulk-import-job",
        "attributes": {
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {"email": "ada@example.com", "first_name": "Ada", "properties": {"favorite_category": "books"}},
                    },
                    {"type": "profile", "attributes": {"email": "grace@example.com", "first_name": "Grace", "last_name": "Hopper"}},
                    {
                        "type": "profile",
                        "attributes": {"email": "alan@example.com", "external_id": "cus_1003", "properties": {"lifetime_value": 99.0}},
                    },
                ]
            }
        },
    }
}

SUBSCRIPTION_BULK_DELETE_JOB = {
    "data": {
        "type": "profile-subscription-bulk-delete-job",
        "attributes": {
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {"email": "ada@example.com", "subscriptions": {"email": {"marketing": {"consent": "UNSUBSCRIBED"}}}},
                    }
                ]
            }
        },
    }
}

SUBSCRIPTION_BULK_CREATE_JOB = {
    "data": {
        "type": "profile-subscription-bulk-create-job",
        "attributes": {
            "profiles": {
                "data": [
                    {
                        "type": "profile",
                        "attributes": {"email": "ada@example.com", "subscriptions": {"email": {"marketing": {"consent": "SUBSCRIBED"}}}},
                    }
                ]
            }
        },
        "relationships": {"list": {"data": {"type": "list", "id": "Y6nRLr"}}},
    }
}

DATA_PRIVACY_DELETION_JOB = {
    "data": {
        "type": "data-privacy-deletion-job",
        "attributes": {"profile": {"data": {"type": "profile", "attributes": {"email": "ada@example.com"}}}},
    }
}

SENDGRID_PUT_CONTACTS = {
    "contacts": [
        {
            "email": "ada@example.com",
            "first_name": "Ada",
            "last_name": "Lovelace",
            "external_id": "cus_1001",
            "custom_fields": {"e1_T": "books", "e2_N": 412.5},
        }
    ]
}

USED_PATHS = {
    "klaviyo": {
        ("post", "/api/profile-import"),
        ("post", "/api/profile-bulk-import-jobs"),
        ("get", "/api/profile-bulk-import-jobs/{job_id}"),
        ("get", "/api/profile-bulk-import-jobs/{id}/import-errors"),
        ("post", "/api/profile-subscription-bulk-delete-jobs"),
        ("post", "/api/profile-subscription-bulk-create-jobs"),
        ("post", "/api/data-privacy-deletion-jobs"),
        ("get", "/api/profiles"),
    },
    "sendgrid": {
        ("put", "/v3/marketing/contacts"),
        ("delete", "/v3/marketing/contacts"),
        ("get", "/v3/marketing/contacts/imports/{id}"),
        ("post", "/v3/marketing/contacts/search/emails"),
    },
}


def klaviyo_post(path: str, body: object, headers: dict[str, str] = KLAVIYO_HEADERS) -> list[str]:
    return check_request("klaviyo", "POST", path, "", headers, json.dumps(body))


def with_change(body: dict, change) -> dict:
    changed = copy.deepcopy(body)
    change(changed)
    return changed


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/profile-import", PROFILE_IMPORT),
        ("/api/profile-bulk-import-jobs", BULK_IMPORT_JOB),
        ("/api/profile-subscription-bulk-delete-jobs", SUBSCRIPTION_BULK_DELETE_JOB),
        ("/api/profile-subscription-bulk-create-jobs", SUBSCRIPTION_BULK_CREATE_JOB),
        ("/api/data-privacy-deletion-jobs", DATA_PRIVACY_DELETION_JOB),
    ],
)
def test_valid_klaviyo_writes_conform(path, body):
    assert klaviyo_post(path, body) == []


def test_klaviyo_body_as_bytes_conforms():
    assert check_request("klaviyo", "POST", "/api/profile-import", "", KLAVIYO_HEADERS, json.dumps(PROFILE_IMPORT).encode()) == []


def test_wrong_data_type_is_reported_with_its_location():
    body = with_change(PROFILE_IMPORT, lambda b: b["data"].update(type="profiles"))
    problems = klaviyo_post("/api/profile-import", body)
    assert len(problems) == 1
    assert "data.type" in problems[0] and "'profiles' is not one of ['profile']" in problems[0]


def test_missing_revision_header_is_reported():
    headers = {k: v for k, v in KLAVIYO_HEADERS.items() if k != "revision"}
    assert klaviyo_post("/api/profile-import", PROFILE_IMPORT, headers) == [
        "POST /api/profile-import: missing required header parameter 'revision'"
    ]


def test_attribute_of_wrong_type_is_reported():
    body = with_change(PROFILE_IMPORT, lambda b: b["data"]["attributes"].update(first_name=42))
    problems = klaviyo_post("/api/profile-import", body)
    assert len(problems) == 1
    assert "data.attributes.first_name" in problems[0] and "42 is not of type 'string'" in problems[0]


def test_wrong_type_inside_bulk_job_names_the_profile():
    body = with_change(BULK_IMPORT_JOB, lambda b: b["data"]["attributes"]["profiles"]["data"][1]["attributes"].update(email=["x"]))
    problems = klaviyo_post("/api/profile-bulk-import-jobs", body)
    assert len(problems) == 1 and "data.attributes.profiles.data[1].attributes.email" in problems[0]


def test_openapi_30_nullable_is_understood():
    nulls = with_change(PROFILE_IMPORT, lambda b: b["data"]["attributes"].update(first_name=None, properties=None))
    assert klaviyo_post("/api/profile-import", nulls) == []
    null_type = with_change(PROFILE_IMPORT, lambda b: b["data"].update(type=None))
    assert any("data.type" in p for p in klaviyo_post("/api/profile-import", null_type))


def test_subscription_delete_needs_unsubscribed_consent():
    body = with_change(
        SUBSCRIPTION_BULK_DELETE_JOB,
        lambda b: b["data"]["attributes"]["profiles"]["data"][0]["attributes"]["subscriptions"]["email"]["marketing"].update(
            consent="SUBSCRIBED"
        ),
    )
    problems = klaviyo_post("/api/profile-subscription-bulk-delete-jobs", body)
    assert len(problems) == 1 and "consent" in problems[0] and "UNSUBSCRIBED" in problems[0]


def test_wrong_content_type_is_reported():
    headers = {**KLAVIYO_HEADERS, "Content-Type": "application/json"}
    problems = klaviyo_post("/api/profile-import", PROFILE_IMPORT, headers)
    assert len(problems) == 1 and "application/vnd.api+json" in problems[0] and "'application/json' not accepted" in problems[0]


def test_body_without_content_type_is_reported():
    headers = {k: v for k, v in KLAVIYO_HEADERS.items() if k != "Content-Type"}
    assert klaviyo_post("/api/profile-import", PROFILE_IMPORT, headers) == [
        "POST /api/profile-import: request body sent without a Content-Type header"
    ]


def test_missing_required_body_and_invalid_json_are_reported():
    assert check_request("klaviyo", "POST", "/api/profile-import", "", KLAVIYO_HEADERS, None) == [
        "POST /api/profile-import: request body is required but none was sent"
    ]
    assert check_request("klaviyo", "POST", "/api/profile-import", "", KLAVIYO_HEADERS, "{not json") == [
        "POST /api/profile-import: request body is not valid application/vnd.api+json"
    ]


@pytest.mark.parametrize("authorization", [None, "", "   "])
def test_missing_authorization_is_reported(authorization):
    headers = {k: v for k, v in KLAVIYO_HEADERS.items() if k != "Authorization"}
    if authorization is not None:
        headers["Authorization"] = authorization
    problems = klaviyo_post("/api/profile-import", PROFILE_IMPORT, headers)
    assert problems == ["POST /api/profile-import: missing or unusable Authorization header; the spec requires Klaviyo-API-Key"]


def test_authorization_with_a_secret_is_also_accepted():
    assert klaviyo_post("/api/profile-import", PROFILE_IMPORT, {**KLAVIYO_HEADERS, "Authorization": "Klaviyo-API-Key pk_test"}) == []


def test_klaviyo_reads_with_path_and_query_parameters_conform():
    headers = {"Authorization": "Klaviyo-API-Key", "revision": "2026-07-15", "Accept": "application/vnd.api+json"}
    assert check_request("klaviyo", "GET", "/api/profile-bulk-import-jobs/01JABCDEF", "", headers, None) == []
    assert (
        check_request("klaviyo", "GET", "/api/profile-bulk-import-jobs/01JABCDEF/import-errors", "page%5Bsize%5D=100", headers, None) == []
    )
    query = 'filter=equals(email,"ada@example.com")&fields[profile]=email,first_name,properties&page[size]=20'
    assert check_request("klaviyo", "GET", "/api/profiles", query, headers, None) == []
    assert check_request("klaviyo", "GET", f"/api/profiles?{query}", "", headers, None) == []


def test_bad_query_parameters_are_reported():
    headers = {"Authorization": "Klaviyo-API-Key", "revision": "2026-07-15"}
    problems = check_request(
        "klaviyo", "GET", "/api/profiles", "page[size]=1000&fields[profile]=email,nickname&fields[profiles]=email", headers, None
    )
    assert len(problems) == 3
    assert any("'fields[profiles]'" in p and "unknown query parameter" in p for p in problems)
    assert any("'fields[profile]'" in p and "'nickname' is not one of" in p for p in problems)
    assert any("'page[size]'" in p and "1000 is greater than the maximum of 100" in p for p in problems)
    problems = check_request("klaviyo", "GET", "/api/profiles", "page[size]=ten", headers, None)
    assert len(problems) == 1 and "'page[size]'" in problems[0]


def test_valid_sendgrid_put_contacts_conforms():
    assert check_request("sendgrid", "PUT", "/v3/marketing/contacts", "", SENDGRID_HEADERS, json.dumps(SENDGRID_PUT_CONTACTS)) == []


@pytest.mark.parametrize(
    ("contacts", "expected"), [([], "[] should be non-empty"), ({"email": "ada@example.com"}, "is not of type 'array'")]
)
def test_sendgrid_contacts_must_be_a_non_empty_list(contacts, expected):
    problems = check_request("sendgrid", "PUT", "/v3/marketing/contacts", "", SENDGRID_HEADERS, json.dumps({"contacts": contacts}))
    assert len(problems) == 1 and "at contacts" in problems[0] and expected in problems[0]


def test_sendgrid_needs_bearer_authorization():
    headers = {**SENDGRID_HEADERS, "Authorization": "Klaviyo-API-Key"}
    problems = check_request("sendgrid", "PUT", "/v3/marketing/contacts", "", headers, json.dumps(SENDGRID_PUT_CONTACTS))
    assert problems == ["PUT /v3/marketing/contacts: missing or unusable Authorization header; the spec requires BearerAuth"]


def test_other_sendgrid_calls_conform():
    headers = {"Authorization": "Bearer"}
    assert check_request("sendgrid", "DELETE", "/v3/marketing/contacts", "ids=a1b2,c3d4", headers, None) == []
    assert check_request("sendgrid", "GET", "/v3/marketing/contacts/imports/9f3e1c2a", "", headers, None) == []
    search = json.dumps({"emails": ["ada@example.com", "grace@example.com"]})
    assert check_request("sendgrid", "POST", "/v3/marketing/contacts/search/emails", "", SENDGRID_HEADERS, search) == []


def test_body_on_an_operation_without_one_is_reported():
    problems = check_request("sendgrid", "DELETE", "/v3/marketing/contacts", "ids=a1b2", SENDGRID_HEADERS, "{}")
    assert problems == ["DELETE /v3/marketing/contacts: this operation takes no request body, but one was sent"]


@pytest.mark.parametrize(
    ("spec", "path"), [("klaviyo", "/api/profile-imports"), ("klaviyo", "/v3/marketing/contacts"), ("sendgrid", "/v3/marketing/contact")]
)
def test_unknown_path_is_reported(spec, path):
    problems = check_request(spec, "POST", path, "", {"Authorization": "Bearer"}, None)
    assert len(problems) == 1 and "unknown path" in problems[0]


def test_unknown_method_is_reported():
    problems = check_request("klaviyo", "DELETE", "/api/profiles", "", KLAVIYO_HEADERS, None)
    assert problems == ["DELETE /api/profiles: method not allowed for /api/profiles in the klaviyo spec (it has ['GET'])"]


def test_unknown_spec_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown spec"):
        check_request("mailchimp", "GET", "/3.0/lists", "", {}, None)


def test_check_recorded_reads_sandbox_entries():
    entry = {
        "method": "PUT",
        "path": "/v3/marketing/contacts",
        "query": "",
        "headers": {"content-type": "application/json"},
        "authorization": "Bearer",
        "body": json.dumps(SENDGRID_PUT_CONTACTS),
    }
    assert check_recorded("sendgrid", entry) == []
    assert check_recorded("sendgrid", {**entry, "authorization": ""}) != []


@pytest.mark.parametrize("spec", sorted(USED_PATHS))
def test_trimmed_spec_keeps_every_operation_we_use(spec):
    raw = json.loads(spec_path(spec).read_text(encoding="utf-8"))
    kept = {(m, p) for p, item in raw["paths"].items() for m in item if m in ("get", "put", "post", "delete", "patch")}
    assert kept == USED_PATHS[spec]
    assert "trim.py" in raw["info"]["x-trimmed-from"]
    assert load_spec(spec).raw["openapi"] == raw["openapi"]


def test_trimmed_specs_match_trim_output():
    sources = [ORIGINALS / source_name for source_name, _ in trim.SPECS.values()]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        pytest.skip(f"original vendor specs not available ({', '.join(missing)}); CI runs on a fresh clone without them")
    for spec in trim.SPECS:
        expected = trim.render(ORIGINALS, spec)
        assert spec_path(spec).read_text(encoding="utf-8") == expected, f"{spec}: re-run python tests/specs/trim.py {ORIGINALS}"
