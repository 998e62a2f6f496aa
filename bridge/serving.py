"""Serving the app until SIGINT or SIGTERM: aiohttp's web.run_app, with or without the lane.

`server.lane` chooses the site. With the lane (the default), bridge.lane.LaneSite answers plain
postbacks itself, for about a quarter less CPU per postback; without it, aiohttp's own TCPSite
answers everything. Either way the runner, the signals and the shutdown are these, so the two
answer and stop alike. The lane leans on aiohttp's internals, and an aiohttp release may break
it: `lane: false` is the way back without a release of ours, so bridge.lane is imported only when
it is on (a lane that no longer imports does not stop a bridge that does not use it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from aiohttp import web


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    lane: bool = True,
    shutdown_timeout: float,
    started: Callable[[str], None],
    before_listening: Callable[[], None] = lambda: None,
) -> None:
    """aiohttp's web.run_app: serve until SIGINT or SIGTERM, then shut down. `before_listening`
    runs once the app has started (its startup hooks: the store, the destinations), before the
    port takes its first connection; `started` once it listens."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def serve() -> None:
        runner = web.AppRunner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout)
        await runner.setup()
        before_listening()
        try:
            site: web.BaseSite
            if lane:
                from bridge.lane import LaneSite

                site = LaneSite(runner, host, port, shutdown_timeout=shutdown_timeout)
            else:
                site = web.TCPSite(runner, host, port)  # the runner holds shutdown_timeout
            await site.start()
            started(site.name)
            await asyncio.Event().wait()  # until a signal ends the loop
        finally:
            await runner.cleanup()

    main = loop.create_task(serve())
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            asyncio.set_event_loop(None)
