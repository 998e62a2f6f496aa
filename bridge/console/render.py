"""The console's HTML: Jinja2 templates from the package, the filters they use (times, phone
numbers, JSON), the chart, and the headers every page carries (a strict Content-Security-Policy:
scripts and styles only from the bridge's own files, nothing inline)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup, escape

from bridge.store import iso

STATIC = files("bridge.console").joinpath("static")
CONTENT_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
POLL_SECONDS = 5  # how often an open page asks for what changed (htmx polling)


def when(value: float | str | None) -> Markup:
    """A time as `<time>`: UTC in the page, the viewer's zone once console.js has run."""
    if value is None or value == "":
        return Markup("<span>-</span>")
    if isinstance(value, int | float):
        text = iso(float(value)) or ""
        moment = datetime.fromtimestamp(float(value), UTC)
    else:
        text = value
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)
        except ValueError:
            return Markup("<span>{}</span>").format(value)
    shown = moment.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}">{}</time>').format(text, shown)


def readable_phone(number: str | None) -> str:
    """`+15552312102` -> `+1 555-231-2102` (North America); other numbers and short codes as they are."""
    if not number:
        return "-"
    if len(number) == 12 and number.startswith("+1") and number[1:].isdigit():
        return f"+1 {number[2:5]}-{number[5:8]}-{number[8:]}"
    return number


def age(seconds: float | None) -> str:
    """`4s`, `3m 12s`, `2h 5m`, `3d 4h`."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def flatten(fields: Any, prefix: str = "") -> list[tuple[str, str]]:
    """An event's raw `fields` as (name, value) rows: nested ones as `CONTENT.FILE[0]`."""
    if isinstance(fields, dict):
        rows = []
        for key, value in fields.items():
            rows.extend(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(fields, list):
        return [row for i, value in enumerate(fields) for row in flatten(value, f"{prefix}[{i}]")]
    return [(prefix, "" if fields is None else str(fields))]


def chart(points: Sequence[tuple[float, int]], *, minutes: int = 60, now: float | None = None) -> Markup:
    """Postbacks per minute as an SVG bar chart (attributes only: the CSP allows no inline style),
    the last `minutes` minutes, one bar each, empty minutes as gaps."""
    now = time.time() if now is None else now
    end = int(now // 60) * 60
    start = end - (minutes - 1) * 60
    counts = {int(at // 60) * 60: n for at, n in points}
    values = [counts.get(start + i * 60, 0) for i in range(minutes)]
    top = max(values) or 1
    step, bar, height, left = 12, 9, 96, 4  # a bar a minute; the drawing is 724 x 122 units
    width = left + minutes * step
    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height + 26}" role="img" aria-labelledby="chart-title">'
        f'<title id="chart-title">Postbacks per minute over the last hour: {sum(values)} in all, '
        f"at most {max(values)} in one minute</title>",
        f'<line class="grid" x1="{left}" y1="12.5" x2="{width}" y2="12.5"/>',
        f'<text class="tick" x="{left}" y="9">{top} a minute</text>',
    ]
    for i, value in enumerate(values):
        h = round(value / top * (height - 12)) if value else 0
        if h:
            at = datetime.fromtimestamp(start + i * 60, UTC).strftime("%H:%M UTC")
            parts.append(
                f'<rect class="bar" x="{left + i * step + 1}" y="{height - h}" width="{bar}" height="{h}">'
                f"<title>{at}: {value}</title></rect>"
            )
    parts.append(f'<line class="axis" x1="{left}" y1="{height + 0.5}" x2="{width}" y2="{height + 0.5}"/>')
    parts.append(f'<text class="tick" x="{left}" y="{height + 18}">an hour ago</text>')
    parts.append(f'<text class="tick" x="{width}" y="{height + 18}" text-anchor="end">now</text>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 -- numbers and fixed text only, nothing a request sent


@cache
def asset_version() -> str:
    """A digest of the static files: their URLs change when they do, so they can be cached."""
    digest = hashlib.sha256()
    for item in sorted(STATIC.iterdir(), key=lambda p: p.name):
        digest.update(item.name.encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()[:12]


def static_url(name: str) -> str:
    return f"/ui/static/{name}?v={asset_version()}"


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("bridge.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, phone=readable_phone, age=age, pretty=pretty, flatten=flatten)
    env.globals.update(static=static_url, poll=POLL_SECONDS, escape=escape)
    return env


def page(
    template: str, context: Mapping[str, Any], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    html = environment().get_template(template).render(**context)
    return web.Response(
        text=html, status=status, content_type="text/html", charset="utf-8", headers={**PAGE_HEADERS, **(headers or {})}
    )


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    suffix = name[name.rfind(".") :] if "." in name else ""
    item = STATIC.joinpath(name)
    if "/" in name or name.startswith(".") or suffix not in CONTENT_TYPES or not item.is_file():
        return web.Response(status=404, text="not found", headers=PAGE_HEADERS)
    cache_for = "public, max-age=31536000, immutable" if request.query.get("v") == asset_version() else "no-cache"
    return web.Response(
        body=item.read_bytes(),
        headers={
            "Content-Type": CONTENT_TYPES[suffix],
            "Cache-Control": cache_for,
            "X-Content-Type-Options": "nosniff",
        },
    )
