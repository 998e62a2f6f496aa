"""The web console at `/ui/` (CONTRACT §8): server-rendered pages behind the admin token, with
htmx (vendored in `static/`) for the parts that update while a page is open."""

from __future__ import annotations

from aiohttp import web

from bridge.console import pages
from bridge.console.render import static
from bridge.console.session import Attempts


async def _to_console(request: web.Request) -> web.StreamResponse:
    return web.Response(
        status=301, headers={"Location": "/ui/"}
    )  # returned: the app's middleware answers raised ones in JSON


def add_routes(app: web.Application) -> None:
    app[pages.ATTEMPTS] = Attempts()
    r = app.router
    r.add_get("/ui", _to_console)
    r.add_get("/ui/", pages.overview)
    r.add_get("/ui/static/{name}", static)
    r.add_get("/ui/login", pages.login_page)
    r.add_post("/ui/login", pages.login)
    r.add_post("/ui/logout", pages.form_post(pages.logout))
    r.add_get("/ui/events", pages.events)
    r.add_get("/ui/events/{event_id}", pages.event_page)
    r.add_post("/ui/events/{event_id}/replay", pages.form_post(pages.replay_event))
    r.add_get("/ui/deliveries", pages.deliveries)
    r.add_get("/ui/dead-letters", pages.dead_letters)
    r.add_post("/ui/deliveries/{delivery_id}/replay", pages.form_post(pages.replay_one))
    r.add_post("/ui/replay", pages.form_post(pages.replay_many))
    r.add_get("/ui/conversations", pages.conversations)
    r.add_get("/ui/routes", pages.routes_page)
    r.add_post("/ui/routes/try", pages.form_post(pages.try_route))
    r.add_post("/ui/routes/reload", pages.form_post(pages.reload_config))
