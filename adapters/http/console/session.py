"""The console's login session: a signed, expiring cookie naming the operator token, and the CSRF
token every form carries.

Stateless (HMAC-SHA256), so any admin process can check it; keyed by every configured token's secret,
so changing the set of tokens (removing or rotating one) ends every session. The cookie is Secure, HttpOnly and SameSite=Strict;
a form's CSRF token is bound to its session (login forms: to a cookie of their own, double-submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

COOKIE = "mergetag_console"
LOGIN_CSRF = "mergetag_login_csrf"
TTL_S = 8 * 3600


@dataclass(frozen=True)
class Session:
    token: str
    """The operator token's name (who is acting, in the audit log)."""
    scopes: frozenset[str]
    nonce: str


class Sessions:
    """Parameters:
      tokens: token name -> (secret, scopes).
    """

    def __init__(self, tokens: Mapping[str, tuple[bytes, frozenset[str]]]) -> None:
        self._tokens = dict(tokens)
        self._key = hashlib.sha256(b"mergetag-console\0" + b"\0".join(sorted(f"{n}={s.hex()}".encode() for n, (s, _) in tokens.items()))).digest()

    def login(self, given: str) -> str | None:
        """The cookie value for the token ``given`` (compared in constant time with each), or None."""
        names = [name for name, (secret, _) in self._tokens.items() if hmac.compare_digest(given.encode(), secret)]
        if not names:
            return None
        body = f"{names[0]}|{int(time.time()) + TTL_S}|{secrets.token_hex(16)}"
        return f"{body}|{self._sign(body)}"

    def check(self, cookie: str | None) -> Session | None:
        if not cookie or cookie.count("|") != 3:
            return None
        body, _, signature = cookie.rpartition("|")
        name, expires, nonce = body.split("|")
        if not hmac.compare_digest(signature, self._sign(body)) or not expires.isdigit() or int(expires) < time.time():
            return None
        if name not in self._tokens:
            return None
        return Session(name, self._tokens[name][1], nonce)

    def csrf(self, session: Session) -> str:
        return self._sign(f"csrf|{session.nonce}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf(session))

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()
