"""`GET /media/<sha256>?expires=...&sig=...`: a kept MMS file, to whoever holds a link the
bridge signed (CONTRACT §9). 403 for a link that is not signed, tampered with or expired
(checked before the store is asked: an unsigned request learns nothing), 404 for a file that is
not kept (never was, or purged), 503 when the media store cannot answer.

The type is sniffed from the bytes, never the origin's; `nosniff` keeps browsers to it, pictures
are shown inline and everything else is a download with a plain name, and a sandboxing CSP
makes sure nothing served here runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from bridge.answers import error
from bridge.config import MediaConfig
from bridge.media import links
from bridge.media.stores import MediaStore, MediaStoreError
from bridge.mediatypes import disposition, sniff

log = logging.getLogger("bridge.media")

# what the running bridge has now: the `media:` config, the open store, the links' key
Current = Callable[[], tuple[MediaConfig | None, MediaStore | None, bytes | None]]


async def media_file(request: web.Request, current: Current) -> web.StreamResponse:
    config, store, key = current()
    if config is None:
        return error(404, "not found")
    if store is None or key is None:
        return error(503, "the media store is not open yet")
    digest = request.match_info["digest"]
    why = links.check(key, digest, request.query.get("expires"), request.query.get("sig"), time.time())
    if why is not None:
        log.info("media link refused", extra={"reason": why, "remote": request.remote})
        return error(403, "this link is not valid (or has expired)")
    try:
        data = await store.get(digest)
    except MediaStoreError as exc:
        log.warning("media store unavailable", extra={"error": str(exc)})
        return error(503, "the media store is unavailable; try again later")
    if data is None:
        return error(404, "no such file (it may have been purged)")
    kind = sniff(data)
    return web.Response(
        body=data,
        headers={
            "Content-Type": kind,
            "Content-Disposition": disposition(kind, digest),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, max-age=3600",
            "Referrer-Policy": "no-referrer",
        },
    )


def add_routes(app: web.Application, current: Current) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await media_file(request, current)

    app.router.add_get("/media/{digest}", handler)
