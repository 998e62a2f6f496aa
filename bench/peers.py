"""Processes the benchmark runs beside the bridge, each a plain aiohttp app:

sink            answers 200 to everything, counts requests (GET /count)
parse-only      parses the XML and answers 200 (the ceiling of any aiohttp XML service)
parse-only-xmltodict   the same with xmltodict (the stack's first parser, which the issue's
                figures were measured with; the bridge has its own, about 3x faster)
forward URL     parses, POSTs JSON to URL, awaits it, answers 200 (non-durable forwarding)
"""

from __future__ import annotations

import json
import sys

import aiohttp
from aiohttp import web

from bridge.postback import parse


def sink(port: int) -> web.Application:
    count = 0

    async def receive(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(text="ok")

    async def get_count(request: web.Request) -> web.Response:
        return web.json_response({"count": count})

    app = web.Application()
    app.router.add_get("/count", get_count)
    app.router.add_post("/{tail:.*}", receive)
    return app


def parse_only(port: int) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        parse(await request.read())
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/postback", handle)
    return app


def parse_only_xmltodict(port: int) -> web.Application:
    import xmltodict  # the bench extra: pip install -e '.[bench]'

    async def handle(request: web.Request) -> web.Response:
        xmltodict.parse(await request.read(), disable_entities=True)
        return web.json_response({"status": "accepted"})

    app = web.Application()
    app.router.add_post("/postback", handle)
    return app


def forward(port: int, url: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        doc = parse(await request.read())
        async with request.app["http"].post(url, data=json.dumps(doc)) as response:
            await response.read()
        return web.json_response({"status": "accepted"})

    async def client(app: web.Application):  # type: ignore[no-untyped-def]
        app["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        yield
        await app["http"].close()

    app = web.Application()
    app.cleanup_ctx.append(client)
    app.router.add_post("/postback", handle)
    return app


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "sink":
        app = sink(port)
    elif kind == "parse-only":
        app = parse_only(port)
    elif kind == "parse-only-xmltodict":
        app = parse_only_xmltodict(port)
    else:
        app = forward(port, sys.argv[3])
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
