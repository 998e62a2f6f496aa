"""The opt-out ledger's rules (CONTRACT §7): which postbacks are a texter's word on whether a
short code may text them. Pure: no I/O.

A texter whose latest word to a short code was an opt-out gets no reply from it until they opt
back in. An opt-out is an SMS_MO whose keyword is STOP, STOPALL, UNSUBSCRIBE, CANCEL, END or
QUIT, or a SUB postback with CODE N302; an opt-in is an SMS_MO whose keyword is START, UNSTOP or
YES, or a SUB N301.

The keyword is the one Skycore names (`<KEYWORD>`), else the first word of the text (the event's
`keyword`, CONTRACT §5); when Skycore names a keyword that is not one of these, the first word of
the text is looked at too. Case does not matter (`stop`, `Stop`), nor punctuation or symbols
around the word (`STOP.`, `"Stop!"`, `*stop*`): a person who writes `Stop.` means it. A word that
merely starts with one (`STOPPED`, `Ending`) is not one. When the two say opposite things, the
opt-out wins: sending to someone who said STOP is the mistake the law punishes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from bridge.event import Event, parse_time

OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP", "YES"})


@dataclass(frozen=True)
class Word:
    """What one postback says: the texter opted out (or back in) of the short code."""

    texter: str
    short_code: str
    opted_out: bool
    word: str  # STOP, START, ..., or N302 / N301
    at: float  # when they said it: the postback's own time, else when it came in


def bare(word: str) -> str:
    """`"Stop!"` -> `STOP`: upper case, without the punctuation and symbols around it
    (full-width forms folded, as phones send them)."""
    folded = unicodedata.normalize("NFKC", word).upper()
    start, end = 0, len(folded)
    while start < end and unicodedata.category(folded[start])[0] in "PSZC":
        start += 1
    while end > start and unicodedata.category(folded[end - 1])[0] in "PSZC":
        end -= 1
    return folded[start:end]


def _verdict(word: str | None) -> bool | None:
    if not word:
        return None
    w = bare(word)
    if w in OPT_OUT_WORDS:
        return True
    if w in OPT_IN_WORDS:
        return False
    return None


def word_of(event: Event) -> Word | None:
    """What `event` says about the texter's consent, or None when it says nothing."""
    texter, short_code = event.get("from"), event.get("to")
    if not texter or not short_code:
        return None
    kind = event.get("type")
    code = (event.get("code") or "").upper()
    said: tuple[bool, str] | None = None
    if kind == "subscriber.opted_out" or (event.get("origin", "").upper() == "SUB" and code == "N302"):
        said = (True, "N302")
    elif kind == "subscriber.opted_in" or (event.get("origin", "").upper() == "SUB" and code == "N301"):
        said = (False, "N301")
    elif kind == "sms.received":
        words = [event.get("keyword")]
        text = (event.get("text") or "").split(None, 1)
        if text:
            words.append(text[0])
        verdicts = [(v, bare(w)) for w in words if w and (v := _verdict(w)) is not None]
        if verdicts:
            said = next(((v, w) for v, w in verdicts if v), verdicts[0])  # an opt-out wins
    if said is None:
        return None
    moment = parse_time(event.get("occurred_at")) or parse_time(event.get("received_at"))
    at = moment.timestamp() if moment else 0.0
    return Word(texter=texter, short_code=short_code, opted_out=said[0], word=said[1], at=at)
