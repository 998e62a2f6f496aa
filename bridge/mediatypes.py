"""What a file is, from its first bytes, never from what its origin says (CONTRACT §9): the type
the bridge serves it with, and whether a browser may show it inline. Pure.

Only types that cannot run script are ever named: no HTML, no SVG, no XML a browser renders.
Anything not recognised is `application/octet-stream`, served as an attachment.
"""

from __future__ import annotations

OCTET_STREAM = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"
# what a browser (and Slack, and a mail reader) may show in place; the rest is downloaded
INLINE = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
EXTENSIONS = {
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/heic": "heic",
    "video/mp4": "mp4",
    "video/3gpp": "3gp",
    "video/3gpp2": "3g2",
    "video/quicktime": "mov",
    "audio/mp4": "m4a",
    "audio/amr": "amr",
    "audio/amr-wb": "awb",
    "audio/mpeg": "mp3",
    "audio/ogg": "ogg",
    "application/pdf": "pdf",
    "text/vcard": "vcf",
    "application/smil": "smil",
    TEXT: "txt",
    OCTET_STREAM: "bin",
}
_PREFIXES = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"#!AMR-WB\n", "audio/amr-wb"),
    (b"#!AMR\n", "audio/amr"),
    (b"%PDF-", "application/pdf"),
    (b"OggS", "audio/ogg"),
    (b"ID3", "audio/mpeg"),
    (b"BM", "image/bmp"),
)
_HEIC_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1")
_TEXT_CONTROLS = frozenset(range(32)) - {9, 10, 12, 13}


def _iso_media(brand: bytes) -> str:
    """An ISO base media file (`....ftyp<brand>`): MP4, 3GPP, QuickTime, HEIC."""
    if brand.startswith(b"3g2"):
        return "video/3gpp2"
    if brand.startswith(b"3g"):
        return "video/3gpp"
    if brand in _HEIC_BRANDS:
        return "image/heic"
    if brand == b"qt  ":
        return "video/quicktime"
    if brand in (b"M4A ", b"M4B "):
        return "audio/mp4"
    return "video/mp4"


def _text(head: bytes) -> str | None:
    """Plain UTF-8 text (a vCard or SMIL named as such); None when it is not text."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # only a character cut off at the end of what was read is fine
            return None
        text = head[: exc.start].decode("utf-8")
    if any(ord(ch) in _TEXT_CONTROLS or ord(ch) == 127 for ch in text):
        return None
    start = text.lstrip("\ufeff \t\r\n")[:64].lower()
    if start.startswith("begin:vcard"):
        return "text/vcard"
    if start.startswith("<smil"):
        return "application/smil"
    return TEXT


def sniff(data: bytes) -> str:
    """The content type of a file that starts with `data` (its first 512 bytes are plenty)."""
    head = data[:512]
    for prefix, kind in _PREFIXES:
        if head.startswith(prefix):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return _iso_media(head[8:12])
    if head:
        return _text(head) or OCTET_STREAM
    return OCTET_STREAM


def disposition(content_type: str, digest: str) -> str:
    """`inline` for a picture a browser shows as it is; a download with a plain name otherwise."""
    if content_type in INLINE:
        return "inline"
    return f'attachment; filename="{filename(content_type, digest)}"'


def filename(content_type: str, digest: str) -> str:
    """A safe name for a kept file: its hash's first 16 digits and the extension of its type."""
    return f"{digest[:16]}.{EXTENSIONS.get(content_type, 'bin')}"
