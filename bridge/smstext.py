"""A Slack message as the text of an SMS, and how many SMS segments it takes (CONTRACT §7).
Pure: no I/O.

Slack sends a message's text in its own markup: `&`, `<` and `>` escaped as `&amp;` `&lt;`
`&gt;`, and mentions, channels and links in angle brackets (`<@U0123>`, `<#C0123|sales>`,
`<https://example.com|our site>`). A texter's phone shows none of that, so it becomes the
readable text a person would have typed: `@U0123`, `#sales`, `our site (https://example.com)`.
"""

from __future__ import annotations

import math
import re

# GSM 03.38: the basic set (one septet each) and the extension table (escape + one: two each)
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")
GSM7_SINGLE, GSM7_PART = 160, 153  # septets: one segment, or each part of a split one
UCS2_SINGLE, UCS2_PART = 70, 67  # UTF-16 code units

_SPECIAL = re.compile(r"<([^<>]*)>")


def _readable(inner: str) -> str:
    """One `<...>` of Slack markup as the text a person reads."""
    target, _, label = inner.partition("|")
    if target.startswith("@"):  # a user: <@U0123> or <@U0123|name>
        return "@" + (label or target[1:])
    if target.startswith("#"):  # a channel
        return "#" + (label or target[1:])
    if target.startswith("!"):  # <!here>, <!subteam^S0123|@team>, <!date^...|fallback>
        if label:
            return label
        command = target[1:].split("^", 1)[0]
        return "@" + command
    if target.startswith("mailto:"):
        return label or target.removeprefix("mailto:")
    if label and label != target:
        return f"{label} ({target})"
    return target


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def plain(text: str) -> str:
    """A Slack message's `text` as plain SMS text: markup made readable, entities decoded
    (after the markup is read: an `&lt;` the person typed stays a `<`, never markup)."""
    parts = _SPECIAL.split(text)  # text, markup, text, markup, ..., text
    out_parts = [unescape(p) if i % 2 == 0 else unescape(_readable(p)) for i, p in enumerate(parts)]
    out = "".join(out_parts)
    return out.strip()


def is_gsm7(text: str) -> bool:
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text)


def length(text: str) -> tuple[str, int]:
    """The encoding an SMS of `text` goes in, and its length in that encoding's units
    (GSM-7 septets, an extension character counting two; UCS-2 UTF-16 code units, an emoji
    outside the BMP counting two)."""
    if is_gsm7(text):
        return "GSM-7", sum(2 if ch in GSM7_EXTENSION else 1 for ch in text)
    return "UCS-2", len(text.encode("utf-16-le")) // 2


def segments(text: str) -> int:
    """How many SMS segments `text` takes: 160 GSM-7 characters in one, 153 each when split;
    otherwise 70 UCS-2 units in one, 67 each when split."""
    encoding, units = length(text)
    single, part = (GSM7_SINGLE, GSM7_PART) if encoding == "GSM-7" else (UCS2_SINGLE, UCS2_PART)
    if units <= single:
        return 1
    return math.ceil(units / part)
