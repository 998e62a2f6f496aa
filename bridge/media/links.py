"""Signed links to kept files (CONTRACT §9): `/media/<sha256>?expires=<unix time>&sig=<hmac>`.

The signature is HMAC-SHA256 over the hash and the expiry with a key every instance shares
(`media.secret`, or a random one kept in the store). A link cannot be made for another file or
made to last longer without the key. Pure.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from bridge.digits import parse_uint

DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]{64}")
_CONTEXT = b"postback-bridge media link\x00"


def key_from_secret(secret: str) -> bytes:
    """The signing key of a configured `media.secret` (any length; hashed to 32 bytes)."""
    return hashlib.sha256(_CONTEXT + secret.encode("utf-8")).digest()


def signature(key: bytes, digest: str, expires: int) -> str:
    return hmac.new(key, f"{digest}.{expires}".encode("ascii"), hashlib.sha256).hexdigest()


def path(key: bytes, digest: str, expires: int) -> str:
    """The path and query of the link to `digest` good until `expires` (Unix seconds)."""
    return f"/media/{digest}?expires={expires}&sig={signature(key, digest, expires)}"


def check(key: bytes, digest: str, expires: str | None, sig: str | None, now: float) -> str | None:
    """None when the link is good; else why not (for the log: the caller only says 403)."""
    if not DIGEST.fullmatch(digest):
        return "not a file's hash"
    when = parse_uint(expires or "", max_digits=12)
    if when is None or not sig:
        return "no signature"
    if not _HEX.fullmatch(sig):
        return "bad signature"
    if not hmac.compare_digest(signature(key, digest, when), sig.lower()):
        return "bad signature"
    if when < now:
        return "expired"
    return None
