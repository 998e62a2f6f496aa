"""The console's sign-in: signed session cookies, CSRF tokens, and a limit on wrong tokens.

Nothing is kept on the server. The signing key is derived from `server.admin_token` (HMAC-SHA256
keyed with the token, of a fixed label), so every instance that shares the config
(several on one PostgreSQL) accepts every other's cookies, and changing the token signs everyone
out. A session is `v1.<expires>.<id>.<signature>`; its CSRF token is an HMAC of its id, so a
form from one session does not work in another.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

SESSION_COOKIE = "pb_console"
LOGIN_COOKIE = "pb_console_login"  # ties the sign-in form to the browser that asked for it
SESSION_SECONDS = 12 * 3600  # a working day: sign in each morning
LOGIN_FORM_SECONDS = 3600
_LABEL = b"postback-bridge console session key v1"


def signing_key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode("utf-8", "surrogateescape"), _LABEL, hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    digest = hmac.new(key, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass(frozen=True)
class Session:
    id: str
    expires: float


def new_session(key: bytes, now: float | None = None) -> tuple[Session, str]:
    """A session and its cookie value."""
    expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
    session = Session(new_nonce(), expires)
    body = f"v1.{expires}.{session.id}"
    return session, f"{body}.{_mac(key, body)}"


def read_session(key: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session a cookie holds, or None: absent, forged, signed with another token, or expired."""
    if not cookie or len(cookie) > 200:
        return None
    body, _, signature = cookie.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _mac(key, body).encode()):
        return None
    version, _, rest = body.partition(".")
    expires_text, _, session_id = rest.partition(".")
    if version != "v1" or not expires_text.isdigit() or not session_id:
        return None
    expires = float(expires_text)
    if expires <= (now if now is not None else time.time()):
        return None
    return Session(session_id, expires)


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def csrf_token(key: bytes, nonce: str, purpose: str = "session") -> str:
    """The token a form carries: bound to a session's id (or the sign-in form's nonce)."""
    return _mac(key, f"csrf.{purpose}.{nonce}")


def csrf_ok(key: bytes, nonce: str | None, given: str | None, purpose: str = "session") -> bool:
    if not nonce or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), csrf_token(key, nonce, purpose).encode())


class Attempts:
    """Wrong tokens per client: at most `allowed` in `window` seconds, then refused until the
    oldest of them is that old. In memory, per instance; the table is bounded, so many
    clients cannot make it grow without end (the oldest entries go first)."""

    def __init__(self, allowed: int = 5, window: float = 60.0, clients: int = 10_000) -> None:
        self.allowed, self.window, self.clients = allowed, window, clients
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, client: str, now: float) -> collections.deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        failures = self._recent(client, now)
        if failures is None or len(failures) < self.allowed:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._recent(client, now) or collections.deque()
        failures.append(now)
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self.clients:
            self._failures.popitem(last=False)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
