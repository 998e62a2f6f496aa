"""Message templates (CONTRACT §9): Jinja2 in a sandbox, with the normalized event as `event`.

Pure: compiling checks a template (syntax, every filter and test it names, even inside an `if`)
and reports the place of a problem to the config's Reader; rendering makes a string or raises
RenderError with the template's place and line. No I/O, no config file.

What bounds a render (the template comes from the config file, the event from a texter):
- Jinja2's ImmutableSandboxedEnvironment: no `_` attributes, no Python internals, no changing
  the event; with StrictUndefined a refused attribute is an error, never a silent blank.
- `range()` is the sandbox's (at most jinja2.sandbox.MAX_RANGE items); `*` and `**` are checked
  before they run, so `'x' * 10**9` or `9 ** 9 ** 9` is an error, not a gigabyte or a hang.
- RENDER_SECONDS of wall time per render, checked on every line the template's code runs (a
  trace function on the rendering thread): a loop in a loop ends with an error. Only a template
  with a loop or a macro can run long, and only such a template is traced (the trace makes a
  render ~10x slower); one without is bounded by its own length, and the filters by the checks
  above.
- MAX_OUTPUT characters of output, counted as the template makes them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup

from bridge.digits import is_digits
from bridge.validate import Reader

MAX_OUTPUT = 1_048_576  # characters a render may make (a Slack message holds 40,000; a mail a few MB)
RENDER_SECONDS = 1.0
MAX_REPEAT = MAX_OUTPUT  # `'ab' * n`: the length it would make
MAX_EXPONENT_BITS = 4096  # `a ** b`: the size of the number it would make
MAX_WIDTH = 10_000  # a width, count or padding given to a string method or filter (`center(n)`)
WIDTH_FILTERS = ("center", "indent", "truncate", "wordwrap", "format", "replace")
# a width or precision in a format: `%5d`, `%-*s`, `{:>20}`, `{0:.3f}`
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|[0-9]+)?(?:\.(\*|[0-9]+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")
_SOURCE = "<template>"  # the file name of Jinja's compiled template code (what the tracer watches)

KINDS = ("text", "html", "json")  # plain text; HTML (autoescaped); text that must parse as JSON


class RenderError(Exception):
    """A template failed to render: `name` (`template.text`), the line, and why."""

    def __init__(self, name: str, line: int | None, message: str) -> None:
        self.name, self.line, self.message = name, line, message
        where = f"line {line}: " if line else ""
        super().__init__(f"{name}: {where}{message}")


class _OverTimeError(Exception):
    pass


def readable_phone(number: Any) -> str:
    """`+15552312102` -> `+1 555-231-2102` (North American numbers); other values as they are,
    None as nothing."""
    if number is None:
        return ""
    text = str(number)
    if len(text) == 12 and text.startswith("+1") and is_digits(text[1:]):
        return f"+1 {text[2:5]}-{text[5:8]}-{text[8:]}"
    return text


def mrkdwn(value: Any) -> str:
    """Slack mrkdwn escaping: a texter's `<!channel>` or `<http://x|click>` stays text."""
    text = "" if value is None else str(value)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _json_default(value: Any) -> Any:
    """What JSON cannot hold: an undefined value says which (StrictUndefined raises as it is
    printed), anything else is a TypeError."""
    if isinstance(value, jinja2.Undefined):
        str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _plain_json(value: Any, indent: int | None = None) -> str:
    """`tojson` outside HTML: plain JSON (non-ASCII as it is), for webhook bodies and Slack blocks."""
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default)


def _check_widths(values: Any) -> None:
    for value in values:
        if type(value) is int and value > MAX_WIDTH:
            raise SecurityError(f"{value} is wider than a string may be made here (at most {MAX_WIDTH})")
        if isinstance(value, str) and ("%" in value or "{" in value):
            _check_format(value)


def _check_format(text: str) -> None:
    """A format string with a width or precision over MAX_WIDTH (or one taken from the
    arguments, `%*d`) is refused before it runs."""
    specs = [n for m in _PERCENT_SPEC.finditer(text) for n in m.groups() if n]
    specs += re.findall(r"[0-9]+|\*", " ".join(_BRACE_SPEC.findall(text)))
    for spec in specs:
        if spec == "*" or int(spec) > MAX_WIDTH:
            raise SecurityError(f"a format width of {spec} (at most {MAX_WIDTH})")


def _width_checked(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose widths and counts are checked first (its value is not: that is the text)."""
    skip = 2 if getattr(f, "jinja_pass_arg", None) else 1
    if name == "format":
        skip -= 1  # its value is the format

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_widths([*args[skip:], *kwargs.values()])
        if name == "replace" and len(args) > skip + 1:
            value, old, new = str(args[skip - 1]), str(args[skip]), str(args[skip + 1])
            count = value.count(old) if old else len(value) + 1
            if len(value) + count * (len(new) - len(old)) > MAX_OUTPUT:
                raise SecurityError(f"replace would make more than {MAX_OUTPUT} characters")
        return f(*args, **kwargs)

    return checked


def _finalize(value: Any) -> Any:
    """A null field prints as nothing, not `None`."""
    return "" if value is None else value


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` checked before they run (and so never folded into a
    constant at compile time, which would run them then)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                    raise SecurityError(f"repeating {len(seq)} items {times} times makes more than {MAX_REPEAT}")
        powers = operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
        if powers and right > 0 and right * left.bit_length() > MAX_EXPONENT_BITS:
            raise SecurityError(f"{left} ** {right} is too large a number")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(method, "__self__", None).__class__ in (str, Markup):  # `'x'.center(n)`, `'{:9}'.format()`
            _check_widths([method.__self__, *args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)


def _environment(*, html: bool) -> _Sandbox:
    env = _Sandbox(
        autoescape=html,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
    )
    del env.globals["lipsum"]  # Python code that runs as long as it is asked to, untraced
    for name in WIDTH_FILTERS:
        env.filters[name] = _width_checked(name, env.filters[name])
    env.filters["phone"] = readable_phone
    env.filters["mrkdwn"] = mrkdwn
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "default": _json_default}
    if not html:  # Jinja's own tojson is for HTML (`<` as \u003c, a Markup string)
        env.filters["tojson"] = _plain_json
    return env


_PLAIN = _environment(html=False)
_HTML = _environment(html=True)


@dataclass(frozen=True)
class Template:
    """One compiled template: where it is in the config, what it must render, and its code."""

    place: str  # destinations.inbox.template.text: for check-config
    name: str  # template.text: for a delivery's reason
    kind: str
    source: str
    compiled: jinja2.Template = field(compare=False, repr=False)
    loops: bool = True  # it has a loop or a macro: rendered under the deadline

    def render(self, event: Mapping[str, Any]) -> str:
        """The rendered text; RenderError when the template fails, runs too long, makes too
        much, or (kind json) does not make JSON."""
        pieces: list[str] = []
        size = 0
        try:
            with _deadline(RENDER_SECONDS) if self.loops else contextlib.nullcontext():
                for piece in self.compiled.generate(event=event):
                    size += len(piece)
                    if size > MAX_OUTPUT:
                        raise RenderError(self.name, None, f"rendered more than {MAX_OUTPUT} characters")
                    pieces.append(piece)
        except RenderError:
            raise
        except _OverTimeError:
            raise RenderError(self.name, None, f"took longer than {RENDER_SECONDS:g}s to render") from None
        except Exception as exc:  # anything the template's code raised: the delivery's reason
            raise RenderError(self.name, _template_line(exc.__traceback__), _describe(exc)) from None
        text = "".join(pieces)
        if self.kind == "json":
            try:
                json.loads(text)
            except ValueError as exc:
                raise RenderError(self.name, None, f"did not render JSON: {exc}") from None
        return text


@dataclass(frozen=True)
class Templates:
    """A destination's `template:`, compiled: name (`text`, `html`, ...) -> Template, plus the
    plain options beside them (`content_type`)."""

    items: tuple[tuple[str, Template], ...] = ()
    options: tuple[tuple[str, str], ...] = ()

    def get(self, name: str) -> Template | None:
        return dict(self.items).get(name)

    def option(self, name: str) -> str | None:
        return dict(self.options).get(name)

    @property
    def loops(self) -> bool:
        """Whether a template may run long (a loop or a macro): worth a thread of its own."""
        return any(template.loops for _, template in self.items)

    def render(self, event: Mapping[str, Any]) -> dict[str, str]:
        """Every template, rendered (all or nothing: RenderError names the first that failed)."""
        return {name: template.render(event) for name, template in self.items}


def compile_template(source: str, place: str, name: str, kind: str, r: Reader) -> Template | None:
    """`source` compiled for `kind`; a syntax error or an unknown filter or test goes to `r` as
    `<place>: line N: ...`, and None comes back."""
    env = _HTML if kind == "html" else _PLAIN
    try:
        tree = env.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        r.error(place, f"line {exc.lineno}: {exc.message}")
        return None
    ok = True
    # Jinja leaves a filter inside an `if` to fail when it runs: named here, wherever it is
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        known = env.filters if isinstance(node, nodes.Filter) else env.tests
        if node.name not in known:
            what = "filter" if isinstance(node, nodes.Filter) else "test"
            r.error(place, f"line {node.lineno}: unknown {what} {node.name!r}")
            ok = False
    for other in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        r.error(place, f"line {other.lineno}: a template cannot extend, include or import another")
        ok = False
    if not ok:
        return None
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateError as exc:  # what parsing let through (a compile-time check)
        line = exc.lineno if isinstance(exc, jinja2.TemplateSyntaxError) else None
        r.error(place, (f"line {line}: " if line else "") + (exc.message or str(exc)))
        return None
    loops = tree.find(nodes.For) is not None or tree.find(nodes.Macro) is not None
    return Template(place, name, kind, source, compiled, loops)


def parse_templates(
    raw: Any, path: str, r: Reader, kinds: Mapping[str, str], options: Mapping[str, tuple[str, ...]] | None = None
) -> Templates | None:
    """A destination's `template:` mapping: each key of `kinds` a template of that kind, each key
    of `options` a plain string (one of the values given, when any). Errors go to `r`."""
    errors_before = len(r.errors)
    extra = options or {}
    data = r.mapping(raw, path, frozenset(kinds) | frozenset(extra))
    if data is None:
        return None
    if not data:
        r.error(path, f"names no template (any of: {', '.join(kinds)})")
        return None
    items = []
    for key, kind in kinds.items():
        if key in data:
            source = r.string(data[key], f"{path}.{key}")
            if source is not None:
                template = compile_template(source, f"{path}.{key}", f"template.{key}", kind, r)
                if template is not None:
                    items.append((key, template))
    plain = []
    for key, allowed in extra.items():
        if key in data:
            value = r.string(data[key], f"{path}.{key}")
            if value is not None and allowed and value not in allowed:
                r.error(f"{path}.{key}", f"expected one of {', '.join(allowed)}, got {value!r}")
            elif value is not None:
                plain.append((key, value))
    if len(r.errors) > errors_before:
        return None
    return Templates(tuple(items), tuple(plain))


# ---------------------------------------------------------------------------- what bounds a render


class _deadline:  # noqa: N801 (a context manager, used as a statement)
    """Wall time for the template's own code on this thread: every line it runs checks the
    clock (Jinja's runtime and the filters, which are bounded, are not traced)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = 0.0
        self.before: Callable[..., Any] | None = None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self.end:
            raise _OverTimeError
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename == _SOURCE:
            return self._local(frame, event, arg)
        return None

    def __enter__(self) -> None:
        self.end = time.monotonic() + self.seconds
        self.before = sys.gettrace()
        sys.settrace(self._global)

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.before)


def _template_line(tb: TracebackType | None) -> int | None:
    """The template's line where an error was raised: Jinja rewrites the traceback so that its
    frames name the template's lines."""
    line = None
    for frame, lineno in _frames(tb):
        if frame.f_code.co_filename == _SOURCE:
            line = lineno
    return line


def _frames(tb: TracebackType | None) -> Iterator[tuple[FrameType, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def _describe(exc: Exception) -> str:
    if isinstance(exc, SecurityError):
        return f"refused by the sandbox: {exc}"
    if isinstance(exc, jinja2.UndefinedError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "too deep a recursion"
    return f"{type(exc).__name__}: {exc}"
