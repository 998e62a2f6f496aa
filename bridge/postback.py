"""Request body -> the postback's fields.

Skycore sends raw XML (any or no Content-Type), some deployments a form with the XML in a field
named `xml`. Every shape is reduced to one dict of element name -> string / nested dict / list,
with the 2014 `<NOTIFICATION>` wrapper removed, so later steps never see the shape.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs
from xml.parsers import expat

import xmltodict

from bridge.errors import PostbackError

Fields = dict[str, Any]

MAX_DEPTH = 16
_BOM = "\ufeff"


class _DTDRefusedError(Exception):
    pass


class _TooDeepError(Exception):
    pass


class _GuardedParser:
    """An expat parser as xmltodict drives it, with DTDs refused and nesting bounded.

    Refusing the DOCTYPE itself means no entity is ever declared, expanded or fetched.
    """

    def __init__(self, parser: Any) -> None:
        object.__setattr__(self, "_parser", parser)
        object.__setattr__(self, "_depth", 0)

        def refuse(*_: Any) -> None:
            raise _DTDRefusedError

        parser.StartDoctypeDeclHandler = refuse
        parser.EntityDeclHandler = refuse
        parser.ExternalEntityRefHandler = refuse
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "StartElementHandler":
            value = self._counting_start(value)
        elif name == "EndElementHandler":
            value = self._counting_end(value)
        elif name == "EntityDeclHandler":
            return  # keep ours: it refuses with a clearer error than xmltodict's
        setattr(self._parser, name, value)

    def _counting_start(self, handler: Any) -> Any:
        def start(*args: Any) -> Any:
            depth = self._depth + 1
            if depth > MAX_DEPTH:
                raise _TooDeepError
            object.__setattr__(self, "_depth", depth)
            return handler(*args)

        return start

    def _counting_end(self, handler: Any) -> Any:
        def end(*args: Any) -> Any:
            object.__setattr__(self, "_depth", self._depth - 1)
            return handler(*args)

        return end


class _GuardedExpat:
    """The `expat` module as xmltodict sees it."""

    @staticmethod
    def ParserCreate(*args: Any, **kwargs: Any) -> _GuardedParser:  # noqa: N802 (expat's name)
        return _GuardedParser(expat.ParserCreate(*args, **kwargs))


def extract_xml(body: bytes, content_type: str = "") -> str:
    """The XML text of a request body: raw, or the `xml` field of a form. Raises PostbackError."""
    if not body.strip():
        raise PostbackError("empty body: expected a Skycore XML postback")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PostbackError(f"body is not valid UTF-8 (byte {exc.start})") from None
    text = text.removeprefix(_BOM).lstrip()
    if not text.startswith("<"):
        text = _xml_from_form(text, content_type)
    return text


def _xml_from_form(text: str, content_type: str) -> str:
    if "=" in text.split("&", 1)[0]:
        try:
            form = parse_qs(text, keep_blank_values=True, strict_parsing=True, errors="strict")
        except (ValueError, UnicodeDecodeError):
            form = {}
        if "xml" in form:
            xml = form["xml"][0].removeprefix(_BOM).lstrip()
            if xml.startswith("<"):
                return xml
            raise PostbackError("form field 'xml' does not hold XML")
        if form:
            raise PostbackError("form body has no field named 'xml'")
    kind = "JSON" if text[:1] in "{[" else "text"
    raise PostbackError(f"body is {kind}, not XML: expected a Skycore <POSTBACK> document")


def parse(body: bytes, content_type: str = "") -> Fields:
    """The postback's fields, wrapper removed. Raises PostbackError for anything else."""
    xml = extract_xml(body, content_type)
    try:
        doc = xmltodict.parse(
            xml,
            expat=_GuardedExpat,
            strip_whitespace=False,
            xml_attribs=False,
            force_list=("FILE",),
        )
    except _DTDRefusedError:
        raise PostbackError("DTDs and entity declarations are not accepted") from None
    except _TooDeepError:
        raise PostbackError(f"XML nested deeper than {MAX_DEPTH} levels") from None
    except expat.ExpatError as exc:
        raise PostbackError(
            f"malformed XML: {expat.ErrorString(exc.code)} at line {exc.lineno}, column {exc.offset}"
        ) from None

    root_name, root = next(iter(doc.items()))
    if root_name != "POSTBACK":
        raise PostbackError(f"root element is <{root_name}>, expected <POSTBACK>")
    fields = _clean(root)
    if not isinstance(fields, dict):
        raise PostbackError("<POSTBACK> is empty")
    wrapped = fields.get("NOTIFICATION")
    if isinstance(wrapped, dict) and "ORIGIN" not in fields:
        fields = {**{k: v for k, v in fields.items() if k != "NOTIFICATION"}, **wrapped}
    origin = fields.get("ORIGIN")
    if not isinstance(origin, str) or not origin.strip():
        raise PostbackError("postback has no <ORIGIN>")
    return fields


def _clean(value: Any) -> Any:
    """xmltodict's output -> our field shape: "" for empty elements, no whitespace-only text
    between child elements, FILE always a list."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key == "#text":
            if item.strip():
                out[key] = item
            continue
        out[key] = _clean(item)
    if "FILE" in out and not isinstance(out["FILE"], list):
        out["FILE"] = [out["FILE"]]
    return out
