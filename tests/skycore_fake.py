"""A fake Skycore API on 127.0.0.1: sendSMS by POST with the request XML in the form field `xml`.

It records every call (the form, the parsed request) and answers like Skycore
(tests/data/skycore-api/sendSMS.md): `<RESPONSE><STATUS>Success</STATUS><TRACKINGID>...` or
`<STATUS>Failure</STATUS><ERRORCODE>E...`. It also refuses what Skycore refuses: a wrong API
key (E104), a missing TO (E201) or TEXT (E712), a number with a `+` (E110), XML that does not
parse (E100).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.conftest import serving, wait_for_arrivals

API_KEY = "Y6r74u6Br4hAVgrolveksjEiiu8yJX"
INFO = {
    "E100": "Invalid request",
    "E104": "User authentication failed",
    "E106": "You can call API every 1 seconds",
    "E110": "Invalid receiver number",
    "E113": "Set throughput exceeded for this API action",
    "E120": "Account has reached the API request limit",
    "E201": "The receiver number is required",
    "E503": "Internal error",
    "E712": "The 'text' is required",
    "E713": "There is a billing problem on your account",
}


@dataclass
class SendCall:
    form: dict[str, str]
    request: dict[str, str]  # element -> text of the <REQUEST>
    headers: dict[str, str]
    at: float
    tracking_id: str | None = None  # when answered Success


@dataclass
class FakeSkycore:
    """`script` is consumed one entry per call: None (answer normally), an error code ("E713":
    a Failure with it), an int (that HTTP status with an HTML page), "slow" (answered normally, a
    second late), or "hang" (no answer for a
    minute)."""

    url: str = ""
    calls: list[SendCall] = field(default_factory=list)
    script: list[Any] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _n: int = 0

    @property
    def api_url(self) -> str:
        return self.url + "/API/wxml/1.3/index.php"

    def sent(self) -> list[SendCall]:
        """The calls Skycore took (answered Success)."""
        return [c for c in self.calls if c.tracking_id]

    async def wait_for(self, count: int, timeout: float = 20.0) -> list[SendCall]:
        await wait_for_arrivals(self.calls, self.arrived, count, timeout, "fake Skycore")
        return self.calls

    @staticmethod
    def _failure(code: str, to: str = "") -> web.Response:
        xml = (
            f"<RESPONSE><STATUS>Failure</STATUS><ERRORCODE>{code}</ERRORCODE>"
            f"<ERRORINFO>{INFO.get(code, 'Error')}</ERRORINFO><TO>{to}</TO></RESPONSE>"
        )
        return web.Response(text=xml, content_type="text/xml")

    async def index(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        fields: dict[str, str] = {}
        try:
            root = ET.fromstring(form.get("xml", ""))
            if root.tag == "REQUEST":
                fields = {child.tag: child.text or "" for child in root}
        except ET.ParseError:
            fields = {}
        call = SendCall(form, fields, dict(request.headers), time.time())
        self.calls.append(call)
        self.arrived.set()
        entry = self.script.pop(0) if self.script else None
        if entry == "hang":
            await asyncio.sleep(60)
        elif entry == "slow":  # answers normally, a second late
            await asyncio.sleep(1)
            entry = None
        if isinstance(entry, int):
            return web.Response(status=entry, text="<html>upstream trouble</html>", content_type="text/html")
        to = fields.get("TO", "")
        if isinstance(entry, str):
            return self._failure(entry, to)
        if not fields:
            return self._failure("E100")
        if fields.get("API_KEY") != API_KEY:
            return self._failure("E104", to)
        if not to:
            return self._failure("E201")
        if not to.isdigit():
            return self._failure("E110", to)
        if not fields.get("TEXT"):
            return self._failure("E712", to)
        self._n += 1
        call.tracking_id = base64.b64encode(f"SMS_{767866 + self._n}".encode()).decode()
        xml = f"<RESPONSE><STATUS>Success</STATUS><TRACKINGID>{call.tracking_id}</TRACKINGID><TO>{to}</TO></RESPONSE>"
        return web.Response(text=xml, content_type="text/xml")


@contextlib.asynccontextmanager
async def fake_skycore() -> AsyncIterator[FakeSkycore]:
    skycore = FakeSkycore()
    app = web.Application()
    app.router.add_post("/API/wxml/1.3/index.php", skycore.index)
    async with serving(app) as skycore.url:
        yield skycore
