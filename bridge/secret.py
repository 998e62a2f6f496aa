from __future__ import annotations

import re
from collections.abc import Iterable


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def redact(text: str, secrets: Iterable[Secret | None]) -> str:
    """`text` with every value of `secrets` masked, and each long word of one (`Bearer <token>`
    echoed as just `<token>`): for what a peer sends back, which may quote our request."""
    for secret in secrets:
        if not secret:
            continue
        value = secret.reveal()
        for part in sorted({value, *(w for w in value.split() if len(w) >= 8)}, key=len, reverse=True):
            text = text.replace(part, "**********")
    return text


def redact_url(url: str) -> str:
    """The URL without its password, whether in the userinfo or as libpq's `?password=`."""
    url = re.sub(r"([?&]password=)[^&#]*", r"\1****", url)
    return re.sub(r"://([^:/@]+):[^/]*@", r"://\1:****@", url)  # up to the last @: a password may hold one
