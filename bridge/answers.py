"""What the HTTP side answers: a postback's reply, made once as bytes so that aiohttp and the
postback lane (bridge.lane) send the same thing, and the JSON errors every endpoint uses."""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Reply:
    """A postback's answer, made once: aiohttp sends it as a web.Response, the postback lane
    (bridge.lane) writes it to the socket itself. Always a JSON body."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.body, content_type="application/json", charset="utf-8",
            headers=dict(self.headers) if self.headers else None,
        )  # fmt: skip


def answer(status: str, event_id: str) -> Reply:
    """`{"status": ..., "id": ...}` and a newline, as json.dumps would write it (both values are
    plain ASCII). The newline ends the line where `curl` prints it, before the shell's prompt."""
    return Reply(200, f'{{"status": "{status}", "id": "{event_id}"}}\n'.encode())


def refusal(status: int, message: str, **headers: str) -> Reply:
    """`{"error": message}` and a newline, as json_response writes it."""
    return Reply(status, json.dumps({"error": message}).encode() + b"\n", tuple(headers.items()))


# the store is down or not up yet: Skycore retries (postbacks; the admin API the same way)
STORE_DOWN = refusal(503, "store unavailable, retry later", **{"Retry-After": "30"})


def error(status: int, message: str, **headers: str) -> web.Response:
    return refusal(status, message, **headers).response()
