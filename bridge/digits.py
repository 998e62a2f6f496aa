"""Numbers from outside (headers, URLs, query strings, the config, the environment, the command
line): ASCII digits only.

`str.isdigit()` is true of '²' and '٣' too: `float('²')` then raises, and `int('٣')` is 3. So a
check with isdigit() lets through text that the conversion refuses (an exception where a 400
or a config error was meant) or reads as another number. Every number the bridge takes from
outside goes through here.
"""

from __future__ import annotations


def is_digits(text: str) -> bool:
    """One or more ASCII digits, nothing else (no sign, space or underscore)."""
    return text.isascii() and text.isdigit()


def parse_uint(text: str, *, max_digits: int = 18) -> int | None:
    """`text` as a whole number when it is 1 to `max_digits` ASCII digits, else None. (18
    digits fit a signed 64-bit column; int() of a long text costs quadratic time and past
    4,300 digits raises.)"""
    return int(text) if len(text) <= max_digits and is_digits(text) else None
