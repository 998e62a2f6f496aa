"""Request body -> the postback's fields.

Skycore sends raw XML (any or no Content-Type), some deployments a form with the XML in a field
named `xml`. Every shape is reduced to one dict of element name -> string / nested dict / list,
with the 2014 `<NOTIFICATION>` wrapper removed, so later steps never see the shape.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn
from urllib.parse import parse_qs
from xml.parsers import expat

from bridge.errors import PostbackError

Fields = dict[str, Any]

MAX_DEPTH = 16
_BOM = "\ufeff"
_MULTIPART = "multipart/form-data"


class _DTDRefusedError(Exception):
    pass


class _TooDeepError(Exception):
    pass


def _refuse(*_: object) -> NoReturn:
    raise _DTDRefusedError


def _tree(xml: str) -> tuple[str, Any]:
    """XML -> (root name, value) straight from expat handlers: an element with children is a
    dict (repeated names become lists, FILE always one), a leaf is its text as sent ("" when
    empty), text between child elements is dropped unless it says something (`#text`).
    Attributes, comments and processing instructions are ignored. Refusing the DOCTYPE itself
    means no entity is ever declared, expanded or fetched."""
    parser = expat.ParserCreate("utf-8")
    parser.buffer_text = True
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    # one frame per open element: [name, children, repeated names, text parts]
    stack: list[list[Any]] = []
    root: list[Any] = []

    def start(name: str, _attrs: Any) -> None:
        if len(stack) >= MAX_DEPTH:
            raise _TooDeepError
        stack.append([name, {}, set(), []])

    def text(data: str) -> None:
        if stack:
            stack[-1][3].append(data)

    def end(_name: str) -> None:
        name, children, _, parts = stack.pop()
        content = "".join(parts)
        if children:
            value: Any = children
            if content.strip():
                children["#text"] = content
        else:
            value = content
        if not stack:
            root.append((name, value))
            return
        siblings, repeated = stack[-1][1], stack[-1][2]
        if name == "FILE":
            siblings.setdefault(name, []).append(value)
        elif name in repeated:
            siblings[name].append(value)
        elif name in siblings:
            siblings[name] = [siblings[name], value]
            repeated.add(name)
        else:
            siblings[name] = value

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    parser.Parse(xml.encode("utf-8"), True)
    name, value = root[0]
    return str(name), value


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
        multipart = content_type.lower().lstrip().startswith(_MULTIPART)
        xml = _xml_from_multipart(body, content_type) if multipart else None
        text = xml if xml is not None else _xml_from_form(text, content_type)
    return text


_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^";\s]{1,70}))', re.IGNORECASE)
_FIELD_NAME = re.compile(rb'(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^;\s]*))', re.IGNORECASE)


def _xml_from_multipart(body: bytes, content_type: str) -> str | None:
    """The `xml` field of a multipart form (`curl -F xml=<postback.xml`, as a value or a file);
    None when the body is not multipart after all (then it is read as any other). One linear
    pass over flat `form-data` parts: no nesting, no transfer encodings, as forms are sent."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        if body.startswith(b"--"):
            raise PostbackError("multipart form without a boundary in its Content-Type")
        return None
    try:
        # a delimiter is the boundary at the start of a line (RFC 2046): the same characters
        # inside a part's content are content
        delimiter = b"\r\n--" + (found.group(1) or found.group(2)).encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise PostbackError("multipart form with an unreadable boundary in its Content-Type") from None
    lines = b"\r\n" + body
    if delimiter not in lines:
        return None
    for part in lines.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            raise PostbackError("malformed multipart form body: a part without a blank line after its headers")
        disposition = next(
            (
                line.partition(b":")[2]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-disposition:")
            ),
            b"",
        )
        name = _FIELD_NAME.search(disposition)
        if name is None or (name.group(1) if name.group(1) is not None else name.group(2)) != b"xml":
            continue
        try:
            return _xml_in_field(content.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PostbackError(f"form field 'xml' is not valid UTF-8 (byte {exc.start})") from None
    raise PostbackError("form body has no field named 'xml'")


def _xml_in_field(value: str) -> str:
    """A form's `xml` field (urlencoded or multipart) as XML text, or why it is not."""
    xml = value.removeprefix(_BOM).lstrip()
    if xml.startswith("<"):
        return xml
    raise PostbackError("form field 'xml' does not hold XML")


def _xml_from_form(text: str, content_type: str) -> str:
    if "=" in text.split("&", 1)[0]:
        try:
            form = parse_qs(text, keep_blank_values=True, strict_parsing=True, errors="strict")
        except (ValueError, UnicodeDecodeError):
            form = {}
        if "xml" in form:
            return _xml_in_field(form["xml"][0])
        if form:
            raise PostbackError("form body has no field named 'xml'")
    kind = "JSON" if text[:1] in "{[" else "text"
    raise PostbackError(f"body is {kind}, not XML: expected a Skycore <POSTBACK> document")


def read_xml(xml: str) -> tuple[str, Any]:
    """Any XML document (an API's answer, say) as (root name, value), parsed as postbacks are:
    no DTD, no entities, at most MAX_DEPTH deep. Raises PostbackError."""
    try:
        return _tree(xml)
    except _DTDRefusedError:
        raise PostbackError("DTDs and entity declarations are not accepted") from None
    except _TooDeepError:
        raise PostbackError(f"XML nested deeper than {MAX_DEPTH} levels") from None
    except expat.ExpatError as exc:
        raise PostbackError(f"malformed XML: {expat.ErrorString(exc.code)}") from None


def parse(body: bytes, content_type: str = "") -> Fields:
    """The postback's fields, wrapper removed. Raises PostbackError for anything else."""
    xml = extract_xml(body, content_type)
    try:
        root_name, fields = _tree(xml)
    except _DTDRefusedError:
        raise PostbackError("DTDs and entity declarations are not accepted") from None
    except _TooDeepError:
        raise PostbackError(f"XML nested deeper than {MAX_DEPTH} levels") from None
    except expat.ExpatError as exc:
        raise PostbackError(
            f"malformed XML: {expat.ErrorString(exc.code)} at line {exc.lineno}, column {exc.offset}"
        ) from None

    if root_name != "POSTBACK":
        raise PostbackError(f"root element is <{root_name}>, expected <POSTBACK>")
    if not isinstance(fields, dict):
        raise PostbackError("<POSTBACK> is empty")
    wrapped = fields.get("NOTIFICATION")
    if isinstance(wrapped, dict) and "ORIGIN" not in fields:
        fields = {**{k: v for k, v in fields.items() if k != "NOTIFICATION"}, **wrapped}
    origin = fields.get("ORIGIN")
    if isinstance(origin, list):
        raise PostbackError(f"postback has {len(origin)} <ORIGIN> elements, expected one")
    if isinstance(origin, dict):
        raise PostbackError("postback has no <ORIGIN> value: the element holds elements, not text such as SMS_MO")
    if origin is None:
        raise PostbackError("postback has no <ORIGIN>")
    if not origin.strip():
        raise PostbackError("postback has no <ORIGIN> value: the element is empty")
    return fields
