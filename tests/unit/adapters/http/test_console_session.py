"""The console's signed session cookie and CSRF tokens: pure."""

import time

from adapters.http.console import session as console_session
from adapters.http.console.session import Sessions

TOKENS = {"ops": (b"ops-secret", frozenset({"read", "operate"})), "viewer": (b"viewer-secret", frozenset({"read"}))}


def test_a_token_signs_in_as_its_name_with_its_scopes():
    sessions = Sessions(TOKENS)
    assert sessions.login("nope") is None
    cookie = sessions.login("ops-secret")
    assert "ops-secret" not in cookie
    found = sessions.check(cookie)
    assert found.token == "ops" and found.scopes == {"read", "operate"}


def test_a_forged_expired_or_revoked_cookie_is_no_session(monkeypatch):
    sessions = Sessions(TOKENS)
    cookie = sessions.login("viewer-secret")
    name, expires, nonce, signature = cookie.split("|")
    assert sessions.check(f"ops|{expires}|{nonce}|{signature}") is None  # another name, same signature
    assert Sessions({"viewer": TOKENS["viewer"]}).check(cookie) is None  # the token set changed: sessions end
    monkeypatch.setattr(console_session.time, "time", lambda: time.monotonic() + 10 * console_session.TTL_S + 2e9)
    assert sessions.check(cookie) is None


def test_csrf_tokens_belong_to_their_session():
    sessions = Sessions(TOKENS)
    first, second = sessions.check(sessions.login("ops-secret")), sessions.check(sessions.login("ops-secret"))
    assert sessions.csrf_ok(first, sessions.csrf(first))
    assert not sessions.csrf_ok(first, sessions.csrf(second)) and not sessions.csrf_ok(first, None)
