"""Request body -> postback fields: every shape Skycore sends, and everything refused (400)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from bridge.errors import PostbackError
from bridge.postback import MAX_DEPTH, parse
from tests.conftest import BILLION_LAUGHS, POSTBACKS

SMS = (
    "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CODE>N211</CODE><FROM>15552312102</FROM><TO>86717</TO>"
    "<TEXT>STOP</TEXT><RECEIVED>2011-09-28T17:31:02-04:00</RECEIVED></POSTBACK>"
)
SMS_FIELDS = {
    "ORIGIN": "SMS_MO",
    "CODE": "N211",
    "FROM": "15552312102",
    "TO": "86717",
    "TEXT": "STOP",
    "RECEIVED": "2011-09-28T17:31:02-04:00",
}


def mms(content: str) -> bytes:
    return (f"<POSTBACK><ORIGIN>MMS_MO</ORIGIN><CODE>N401</CODE>{content}</POSTBACK>").encode()


# ---------------------------------------------------------------------------- accepted shapes


@pytest.mark.parametrize(
    "content_type",
    [
        "",
        "application/xml",
        "text/xml; charset=utf-8",
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "application/json",
    ],
)
def test_raw_xml_whatever_the_content_type(content_type):
    assert parse(SMS.encode(), content_type) == SMS_FIELDS


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xef\xbb\xbf" + SMS.encode(), id="utf8-bom"),
        pytest.param(b"\n\r\n \t" + SMS.encode() + b"\n\n", id="whitespace-around"),
        pytest.param(b'<?xml version="1.0" encoding="UTF-8"?>\n' + SMS.encode(), id="xml-declaration"),
        pytest.param(b"\xef\xbb\xbf<?xml version='1.0'?>" + SMS.encode(), id="bom-and-declaration"),
        pytest.param(b"  \n<?xml version='1.0'?>\n" + SMS.encode(), id="whitespace-then-declaration"),
        pytest.param(SMS.replace("><", ">\n    <").encode(), id="indented"),
        pytest.param(b"<!-- from Skycore -->" + SMS.encode(), id="comment-before-root"),
        pytest.param(
            SMS.replace("<POSTBACK>", "<POSTBACK><NOTIFICATION>")
            .replace("</POSTBACK>", "</NOTIFICATION></POSTBACK>")
            .encode(),
            id="notification-wrapper",
        ),
        pytest.param(urlencode({"xml": SMS}).encode(), id="form-field-xml"),
        pytest.param(urlencode({"account": "42", "xml": SMS, "sig": ""}).encode(), id="form-with-other-fields"),
        pytest.param(urlencode({"xml": "\ufeff  " + SMS}).encode(), id="form-field-with-bom"),
    ],
)
def test_every_shape_gives_the_same_fields(body):
    assert parse(body, "application/x-www-form-urlencoded") == SMS_FIELDS


BOUNDARY = "bridge-test-7d3a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*fields: tuple[str, str, str | None]) -> bytes:
    """A multipart form as `curl -F name=value` (or `name=@file`, with a file name) sends it."""
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
        head += "Content-Type: application/xml\r\n" if filename else ""
        out += (head + "\r\n").encode() + value.encode() + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(multipart(("xml", SMS, None)), id="value"),
        pytest.param(multipart(("account", "42", None), ("xml", SMS, "postback.xml")), id="file-among-fields"),
        pytest.param(multipart(("xml", "\ufeff " + SMS, None)), id="with-bom"),
    ],
)
def test_a_multipart_form_field_xml_gives_the_same_fields(body):
    assert parse(body, MULTIPART) == SMS_FIELDS


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        pytest.param(multipart(("account", "42", None)), MULTIPART, "no field named 'xml'", id="no-xml-field"),
        pytest.param(multipart(("xml", "hello", None)), MULTIPART, "does not hold XML", id="xml-not-xml"),
        pytest.param(b"--nope\r\nhello", MULTIPART, "body is text, not XML", id="not-multipart-after-all"),
        pytest.param(multipart(("xml", SMS, None)), "multipart/form-data", "without a boundary", id="no-boundary"),
        pytest.param(
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=xml\r\n".encode(),
            MULTIPART,
            "without a blank line",
            id="part-without-body",
        ),
        pytest.param(
            # parts nested 1,000 deep (a form's parts are flat: never followed, never recursed into)
            f"--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n".encode()
            + b"".join(
                b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(1000)
            )
            + f"\r\n--{BOUNDARY}--\r\n".encode(),
            MULTIPART,
            "no field named 'xml'",
            id="nested-1000-deep",
        ),
    ],
)
def test_a_bad_multipart_form_is_refused_with_a_reason(body, content_type, message):
    with pytest.raises(PostbackError, match=message):
        parse(body, content_type)


@pytest.mark.parametrize(
    "content_type", [MULTIPART, "multipart/form-data", "application/x-www-form-urlencoded; x=multipart/form-data"]
)
def test_a_form_labelled_multipart_that_is_urlencoded_is_still_read(content_type):
    assert parse(urlencode({"xml": SMS}).encode(), content_type) == SMS_FIELDS


def test_the_boundary_inside_a_part_is_content_not_a_delimiter():
    text = f"hi x--{BOUNDARY} there"
    body = multipart(("note", f"see --{BOUNDARY}", None), ("xml", SMS.replace("<TEXT>STOP<", f"<TEXT>{text}<"), None))
    assert parse(body, MULTIPART)["TEXT"] == text


def test_a_multipart_form_of_many_small_parts_finds_its_xml_field():
    body = multipart(*[(f"f{n}", "x", None) for n in range(1000)], ("xml", SMS, None))
    assert parse(body, MULTIPART) == SMS_FIELDS


def test_the_wrapper_gives_the_same_fields_as_the_plain_shape():
    wrapped = parse((POSTBACKS / "mms_mo_notification_wrapper.xml").read_bytes())
    plain = parse((POSTBACKS / "mms_mo_subject.xml").read_bytes())
    assert wrapped == {k: v for k, v in plain.items() if k != "SUBJECT"}


def test_elements_next_to_the_wrapper_are_kept():
    body = b"<POSTBACK><ACCOUNT>7</ACCOUNT><NOTIFICATION><ORIGIN>SMS_MO</ORIGIN></NOTIFICATION></POSTBACK>"
    assert parse(body) == {"ACCOUNT": "7", "ORIGIN": "SMS_MO"}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("<CONTENT><FILE>https://m/1.jpg</FILE></CONTENT>", {"FILE": ["https://m/1.jpg"]}),
        ("<CONTENT><FILE>a</FILE><FILE>b</FILE><FILE>c</FILE></CONTENT>", {"FILE": ["a", "b", "c"]}),
        ("<CONTENT>\n  <FILE>a</FILE>\n  <FILE>b</FILE>\n</CONTENT>", {"FILE": ["a", "b"]}),
        ("<CONTENT></CONTENT>", ""),
        ("<CONTENT/>", ""),
        ("<CONTENT>\n</CONTENT>", "\n"),
        ("<CONTENT><FILE/></CONTENT>", {"FILE": [""]}),
    ],
)
def test_content_and_file_shapes(content, expected):
    assert parse(mms(content))["CONTENT"] == expected


def test_no_content_element():
    assert "CONTENT" not in parse(mms("<FROM>15552312102</FROM>"))


def test_empty_elements_are_empty_strings():
    fields = parse(b"<POSTBACK><ORIGIN>SMS_MT</ORIGIN><FROM_MASK></FROM_MASK><TEXT/><SPID> </SPID></POSTBACK>")
    assert fields == {"ORIGIN": "SMS_MT", "FROM_MASK": "", "TEXT": "", "SPID": " "}


def test_unknown_elements_are_kept_nested_and_repeated():
    body = (
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><CARRIER_INFO><NAME>X</NAME><MCC>310</MCC></CARRIER_INFO>"
        b"<TAG>a</TAG><TAG>b</TAG><NEW_THING>1</NEW_THING></POSTBACK>"
    )
    assert parse(body) == {
        "ORIGIN": "SMS_MO",
        "CARRIER_INFO": {"NAME": "X", "MCC": "310"},
        "TAG": ["a", "b"],
        "NEW_THING": "1",
    }


@pytest.mark.parametrize(
    ("text_xml", "expected"),
    [
        ("  Hello \n world  ", "  Hello \n world  "),
        ("\tSTOP\n", "\tSTOP\n"),
        ("Tom &amp; Jerry &lt;3", "Tom & Jerry <3"),
        ("caf&#233; &#x2615;", "café ☕"),
        ("<![CDATA[<b>raw</b> & more]]>", "<b>raw</b> & more"),
        ("café ☕ 日本", "café ☕ 日本"),
    ],
)
def test_text_is_kept_as_sent(text_xml, expected):
    body = f"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>{text_xml}</TEXT></POSTBACK>".encode()
    assert parse(body)["TEXT"] == expected


def test_attributes_do_not_change_the_fields():
    body = b'<POSTBACK version="2"><ORIGIN type="x">SMS_MO</ORIGIN></POSTBACK>'
    assert parse(body) == {"ORIGIN": "SMS_MO"}


def test_a_declared_encoding_does_not_override_utf8():
    body = '<?xml version="1.0" encoding="ISO-8859-1"?><POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>café</TEXT></POSTBACK>'
    assert parse(body.encode("utf-8"))["TEXT"] == "café"


def test_unknown_origin_is_a_postback():
    assert parse(b"<POSTBACK><ORIGIN>SOMETHING_NEW</ORIGIN></POSTBACK>") == {"ORIGIN": "SOMETHING_NEW"}


@pytest.mark.parametrize("path", sorted(POSTBACKS.glob("*.xml")), ids=lambda p: p.name)
def test_every_reference_postback_parses(path):
    assert parse(path.read_bytes())["ORIGIN"]


# ---------------------------------------------------------------------------- refused

REFUSED = [
    pytest.param(b"", "empty body", id="empty"),
    pytest.param(b" \r\n\t ", "empty body", id="whitespace-only"),
    pytest.param(b"\xef\xbb\xbf", "not XML", id="bom-only"),
    pytest.param(b"hello world", "body is text, not XML", id="text"),
    pytest.param(b'{"ORIGIN": "SMS_MO"}', "body is JSON, not XML", id="json"),
    pytest.param(b"[1, 2]", "body is JSON, not XML", id="json-list"),
    pytest.param(b"<html><body>Hi</body></html>", "root element is <html>", id="html"),
    pytest.param(b"<!DOCTYPE html><html><body>Hi</body></html>", "DTD", id="html-doctype"),
    pytest.param(SMS[:-6].encode(), "malformed XML", id="truncated"),
    pytest.param(b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN>", "malformed XML", id="unclosed-root"),
    pytest.param(b"<POSTBACK><ORIGIN>SMS_MO</FROM></POSTBACK>", "malformed XML", id="mismatched-tag"),
    pytest.param(SMS.encode() + SMS.encode(), "malformed XML", id="two-documents"),
    pytest.param(
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&nbsp;</TEXT></POSTBACK>", "malformed XML", id="undefined-entity"
    ),
    pytest.param(BILLION_LAUGHS, "DTD", id="billion-laughs"),
    pytest.param(
        b'<!DOCTYPE POSTBACK [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&x;</TEXT></POSTBACK>",
        "DTD",
        id="external-file-entity",
    ),
    pytest.param(
        b'<!DOCTYPE POSTBACK [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN></POSTBACK>",
        "DTD",
        id="parameter-entity",
    ),
    pytest.param(
        b'<!DOCTYPE POSTBACK SYSTEM "http://127.0.0.1:9/p.dtd"><POSTBACK><ORIGIN>X</ORIGIN></POSTBACK>',
        "DTD",
        id="external-dtd",
    ),
    pytest.param(
        b"<NOTIFICATION><ORIGIN>SMS_MO</ORIGIN></NOTIFICATION>", "root element is <NOTIFICATION>", id="wrong-root"
    ),
    pytest.param(b"<postback><ORIGIN>SMS_MO</ORIGIN></postback>", "root element is <postback>", id="lower-case-root"),
    pytest.param(b"<POSTBACK><CODE>N211</CODE><FROM>1</FROM></POSTBACK>", "no <ORIGIN>", id="no-origin"),
    pytest.param(b"<POSTBACK><ORIGIN>  </ORIGIN></POSTBACK>", "no <ORIGIN>", id="blank-origin"),
    pytest.param(b"<POSTBACK><ORIGIN><X>1</X></ORIGIN></POSTBACK>", "no <ORIGIN>", id="nested-origin"),
    pytest.param(b"<POSTBACK><ORIGIN>  </ORIGIN></POSTBACK>", "the element is empty", id="blank-origin-said"),
    pytest.param(
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><ORIGIN>MMS_MO</ORIGIN></POSTBACK>",
        "postback has 2 <ORIGIN> elements, expected one",
        id="two-origins",
    ),
    pytest.param(b"<POSTBACK/>", "empty", id="empty-root"),
    pytest.param(b"<POSTBACK>text only</POSTBACK>", "empty", id="text-only-root"),
    pytest.param(
        b"<POSTBACK><NOTIFICATION><CODE>1</CODE></NOTIFICATION></POSTBACK>", "no <ORIGIN>", id="wrapper-without-origin"
    ),
    pytest.param(
        b"<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>\xff\xfe</TEXT></POSTBACK>", "not valid UTF-8", id="invalid-utf8"
    ),
    pytest.param("<POSTBACK><ORIGIN>SMS_MO</ORIGIN></POSTBACK>".encode("utf-16"), "not valid UTF-8", id="utf-16"),
    pytest.param(b"account=42&sig=abc", "no field named 'xml'", id="form-without-xml"),
    pytest.param(b"xml=hello", "form field 'xml' does not hold XML", id="form-xml-not-xml"),
    pytest.param(urlencode({"xml": "<html></html>"}).encode(), "root element is <html>", id="form-xml-html"),
    pytest.param(
        b"<POSTBACK><ORIGIN>X</ORIGIN>" + b"<A>" * MAX_DEPTH + b"</A>" * MAX_DEPTH + b"</POSTBACK>",
        "nested deeper",
        id="too-deep",
    ),
]


@pytest.mark.parametrize(("body", "message"), REFUSED)
def test_refused_with_a_message_saying_why(body, message):
    with pytest.raises(PostbackError) as caught:
        parse(body, "application/x-www-form-urlencoded")
    assert message in str(caught.value)


def test_entities_are_never_expanded():
    with pytest.raises(PostbackError) as caught:
        parse(BILLION_LAUGHS)
    assert "lol" not in str(caught.value)


def test_an_external_file_entity_is_not_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    body = (
        f'<!DOCTYPE POSTBACK [<!ENTITY x SYSTEM "{secret.as_uri()}">]>'
        "<POSTBACK><ORIGIN>SMS_MO</ORIGIN><TEXT>&x;</TEXT></POSTBACK>"
    ).encode()
    with pytest.raises(PostbackError) as caught:
        parse(body)
    assert "TOP-SECRET" not in str(caught.value)


def test_nesting_up_to_the_limit_is_fine():
    depth = MAX_DEPTH - 2  # POSTBACK and the first level under it count too
    body = b"<POSTBACK><ORIGIN>X</ORIGIN><A>" + b"<A>" * depth + b"v" + b"</A>" * depth + b"</A></POSTBACK>"
    assert parse(body)["ORIGIN"] == "X"
