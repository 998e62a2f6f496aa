"""`postback-bridge`: serve, check-config, route, deliveries, replay (CONTRACT §2); healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bridge import __version__, logs, replies
from bridge.config import Config, defaults, load
from bridge.destinations.registry import build_all
from bridge.digits import parse_uint
from bridge.dryrun import describe_match, route_report, routes_said
from bridge.errors import BridgeError, ConfigError, PostbackError, StoreError
from bridge.event import phone
from bridge.secret import redact_url
from bridge.store import STATUSES, DeliveryFilter, Store, open_store, sqlite_path
from bridge.validate import parse_when


def _config(path: str | None, *, required: bool = True) -> Config:
    path = path or os.environ.get("BRIDGE_CONFIG") or None
    if path is None:
        if required:
            raise ConfigError(["no config file: give -c FILE or set BRIDGE_CONFIG"])
        return defaults()
    return load(path)


def _print_errors(exc: ConfigError, path: str | None) -> None:
    _print_problems(exc.problems, "error", path or os.environ.get("BRIDGE_CONFIG") or "config")


def _print_problems(problems: Sequence[str], kind: str, where: str) -> None:
    print(f"{where}: {len(problems)} {kind}{'s' if len(problems) != 1 else ''}:", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)


# ---------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from bridge.app import create_app
    from bridge.runtime import settle_heap
    from bridge.serving import run_app

    config = _config(args.config, required=False)
    logs.setup(args.log_level)
    server = config.server  # a public listen without auth is a config error: see config.build
    app = create_app(config)
    log = logs.logger.getChild("serve")
    for warning in config.warnings():
        log.warning("config warning", extra={"warning": warning})

    def started(_: str) -> None:
        log.info(
            "listening",
            extra={
                "version": __version__,
                "listen": f"{server.host}:{server.port}",
                "postback_path": server.postback_path,
                "lane": server.lane,
                "destinations": sorted(config.destinations),
                "routes": len(config.routes),
            },
        )

    try:
        run_app(
            app,
            host=server.host,
            port=server.port,
            lane=server.lane,
            shutdown_timeout=10.0,
            started=started,
            before_listening=settle_heap,  # what starting made lives as long as the process
        )
    except BridgeError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        logs.flush()
        print(f"postback-bridge: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        logs.flush()
        print(f"postback-bridge: cannot listen on {server.host}:{server.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    logs.flush()
    return 0


# ---------------------------------------------------------------------------- check-config, route


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args.config)
    print(f"{config.source}: ok")
    print(f"  listen {config.server.host}:{config.server.port}, postback path {config.server.postback_path}")
    print(f"  store {redact_url(config.store)}")
    print(f"  destinations ({len(config.destinations)}):")
    for name, destination in build_all(config.destinations).items():
        templates = getattr(destination, "template", None)  # compiled and checked by the config already
        shown = f"; template: {', '.join(n for n, _ in templates.items)}" if templates is not None else ""
        print(f"    {name} [{destination.type_name}] {destination.describe()}{shown}")
    print(f"  routes ({len(config.routes)}):")
    for r in config.routes:
        cont = " (continue)" if r.continue_ else ""
        to = ", ".join(r.to) if r.to else "nothing (drop)"
        print(f"    {r.name}: {describe_match(r.match)} -> {to}{cont}")
    if config.media is not None:
        m = config.media
        print(
            f"  media: kept in {redact_url(m.store)}, up to {m.max_bytes} bytes a file for {m.keep / 86400:g}d;"
            f" deliveries wait up to {m.wait:g}s; links {m.public_url}/media/..."
            + ("; private addresses allowed" if m.allow_private else "")
        )
    uploading = sorted(name for name, spec in config.destinations.items() if getattr(spec.options, "upload_media", 0))
    if uploading:
        print(f"  upload_media ({', '.join(uploading)}): the Slack app needs the bot scope files:write")
        if config.media is None:
            print("    (no media: section: nothing is kept, so nothing is uploaded)")
    if config.default:
        print(f"  default -> {', '.join(config.default)}")
    else:
        print("  default: none (unmatched events are counted and dropped)")
    slack_app = replies.needs(config)
    if slack_app:
        print("  replies from Slack: what the Slack app needs")
        for line in slack_app:
            print(f"    {line}")
    warnings = config.warnings()
    if warnings:  # allowed, so still exit 0; on stderr, as the errors are
        _print_problems(warnings, "warning", str(config.source))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from bridge.carriers import Carriers

    config = _config(args.config)
    carriers = Carriers(config.carriers)
    failed = 0
    reports = []
    destinations = build_all(config.destinations)  # live, never opened: what each would send
    for file in args.postbacks:
        try:
            report = route_report(Path(file).read_bytes(), config, destinations, carriers, name=file)
        except (OSError, PostbackError) as exc:
            why = f"cannot read: {exc.strerror or exc}" if isinstance(exc, OSError) else f"not a postback: {exc}"
            print(f"{file}: {why}", file=sys.stderr)
            reports.append({"file": file, "error": why})
            failed += 1
            continue
        reports.append(report)
        if not args.json:
            _print_route_report(report)
    if args.json:  # always a list, one entry per file in order, as `docker inspect` does
        print(json.dumps(reports, indent=2, ensure_ascii=False))
    return 1 if failed else 0


def _print_route_report(report: dict[str, Any]) -> None:
    print(f"== {report['file']}")
    print("event:")
    print(_indent(json.dumps(report["event"], indent=2, ensure_ascii=False)))
    print(f"routes matched: {routes_said(report)}")
    if not report["destinations"]:
        print("destinations: none (dropped)")
    for name, send in report["destinations"].items():
        print(f"-> {name} [{send['type']}] via {send['via']}, would send:")
        print(_indent(json.dumps(send["would_send"], indent=2, ensure_ascii=False), 4))
    print()


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


# ---------------------------------------------------------------------------- deliveries, replay


def _when(text: str) -> float:
    """`--since`/`--until`: an ISO 8601 time, or a duration meaning that long ago (`2h`)."""
    try:
        return parse_when(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def whole_number(text: str) -> int:
    """A delivery id or a limit: ASCII digits (argparse's int() takes '٣' as 3)."""
    number = parse_uint(text)
    if number is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return number


def _filter(args: argparse.Namespace, **extra: Any) -> DeliveryFilter:
    return DeliveryFilter(
        status=extra.get("status", getattr(args, "status", None)),
        destination=args.destination,
        event_id=args.event,
        since=args.since,
        until=args.until,
        ids=tuple(args.ids) if getattr(args, "ids", None) else None,
        limit=args.limit,
    )


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _next(row: Any) -> str:
    """When a pending delivery is next tried: `due` once that time is past (it waits its turn,
    or behind the one delivery that probes a destination that is down), never a time gone by."""
    if row.status != "pending" or row.next_at is None:
        return "-"
    return "due" if row.next_at <= time.time() else _iso(row.next_at)


class NoStoreError(StoreError):
    """The config's SQLite file is not there: `serve` has not run yet, or `store:` has a typo."""


def _with_store(config: Config, fn: Any) -> Any:
    """`fn(store)`'s result, with the config's store open."""
    if config.store.startswith("sqlite:///") and not os.path.exists(sqlite_path(config.store)):
        # not made here: a typo in `store:` would read as "nothing is dead", and leave a file
        path = sqlite_path(config.store)
        if config.source is None:
            raise NoStoreError(
                f"no store at {path}: `serve` with no config file makes it in the directory it runs in; "
                "for another store, give -c FILE or set BRIDGE_CONFIG"
            )
        raise NoStoreError(f"no store at {path}: `serve` makes it; is `store:` in {config.source} right?")
    return asyncio.run(_using(open_store(config.store), fn))


async def _using(store: Store, fn: Any) -> Any:
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _listed(config: Config, fetch: Any, as_json: bool, empty: str) -> list[Any] | None:
    """The rows `fetch(store)` reads for a listing; None once they are printed as JSON, or said
    to be none. A store not made yet (no `serve` has run, or a typo in `store:`) lists nothing,
    and stderr says why."""
    try:
        rows: list[Any] = _with_store(config, fetch)
    except NoStoreError as exc:
        print(f"postback-bridge: {exc}", file=sys.stderr)
        rows = []
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return None
    if not rows:
        print(empty)
        return None
    return rows


def _print_table(table: Sequence[Sequence[str]]) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_deliveries(args: argparse.Namespace) -> int:
    config = _config(args.config, required=False)  # with none, the store `serve` uses with none
    rows = _listed(config, lambda store: store.list_deliveries(_filter(args)), args.json, "no deliveries match")
    if rows is None:
        return 0
    tracked = any(r.tracking_id for r in rows)  # a TRACKING column when a peer gave ids (skycore)
    table = [("ID", "EVENT", "DESTINATION", "STATUS", "ATTEMPTS", "CREATED", "NEXT", *(("TRACKING",) * tracked),
              "LAST ERROR")]  # fmt: skip
    for r in rows:
        table.append(
            (
                str(r.id),
                r.event_id,
                r.destination,
                r.status,
                str(r.attempts),
                _iso(r.created_at),
                _next(r),
                *((r.tracking_id or "",) * tracked),
                r.last_error or "",  # the last column: whole, not cut in the middle of an address
            )
        )
    _print_table(table)
    return 0


def cmd_optouts(args: argparse.Namespace) -> int:
    """The opt-out ledger (CONTRACT §7): who may not be texted by which short code, and who
    opted back in."""
    config = _config(args.config, required=False)
    number = phone(args.number.strip()) if args.number else None  # 15551234888 finds +15551234888
    empty = "no one has opted out or back in" + (f" ({number})" if number else "")
    rows = _listed(config, lambda store: store.list_optouts(number, limit=args.limit), args.json, empty)
    if rows is None:
        return 0
    table = [("TEXTER", "SHORT CODE", "STATE", "WORD", "AT", "EVENT")]
    for r in rows:
        state = "opted out" if r.opted_out else "opted in"
        table.append((r.texter, r.short_code, state, r.word, _iso(r.at), r.event_id))
    _print_table(table)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if not (args.ids or args.destination or args.event or args.since or args.until or args.all):
        print("replay: say which deliveries: ids, --destination, --event, --since/--until, or --all", file=sys.stderr)
        return 2
    config = _config(args.config, required=False)
    known = (*config.destinations, *sorted(config.internal))  # the bridge's own (~feedback) too
    if args.destination and args.destination not in known:
        print(f"replay: destination {args.destination!r} is not in {config.source}", file=sys.stderr)
        return 2
    # only to destinations the config has: a replay to a removed one would wait forever
    where = replace(_filter(args, status=None), destinations=known)

    async def replay(store: Store) -> tuple[list[int], list[int], list[tuple[int, str]]]:
        """The ids replayed; of the ids asked for, those that do not exist, and those (with their
        destination) to a destination the config does not have."""
        ids = await store.replay(where, force=args.force)
        if not args.ids:
            return ids, [], []
        found = await store.list_deliveries(DeliveryFilter(ids=tuple(args.ids), limit=len(args.ids)))
        unknown = sorted(set(args.ids) - {row.id for row in found})
        gone = sorted((row.id, row.destination) for row in found if row.destination not in known)
        return ids, unknown, gone

    ids, unknown, elsewhere = _with_store(config, replay)
    if args.json:
        print(json.dumps({"replayed": ids, **({"unknown": unknown} if unknown else {})}))
    else:
        noun = "delivery" if len(ids) == 1 else "deliveries"
        print(f"replayed {len(ids)} {noun}" + (f": {', '.join(map(str, ids))}" if ids else ""))
        if not ids and not args.force and not unknown and not elsewhere:
            print("(only dead and failed deliveries are replayed; add --force to send delivered ones again)")
    if unknown:
        print(f"replay: no delivery {', '.join(map(str, unknown))}", file=sys.stderr)
    for delivery_id, destination in elsewhere:  # it would wait for ever: not replayed
        print(f"replay: delivery {delivery_id} is to {destination!r}, not in {config.source}", file=sys.stderr)
    return 1 if unknown or elsewhere else 0


# ---------------------------------------------------------------------------- healthcheck

# An address that listens on every interface is asked on loopback: nobody can connect to 0.0.0.0.
_EVERY_INTERFACE = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104


def cmd_healthcheck(args: argparse.Namespace) -> int:
    """For a container's HEALTHCHECK: GET `--path` on the address the config listens on, so a
    port changed in the config is followed (and the image needs no curl). Exit 0 on a 200."""
    config = _config(args.config, required=False)
    host = _EVERY_INTERFACE.get(config.server.host, config.server.host)
    where = f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"
    connection = http.client.HTTPConnection(host, config.server.port, timeout=args.timeout)
    try:
        connection.request("GET", args.path, headers={"User-Agent": f"postback-bridge/{__version__} healthcheck"})
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"healthcheck: {where}{args.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"healthcheck: {where}{args.path} answered {status}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postback-bridge", description="Skycore postbacks to Slack, email and webhooks."
    )
    parser.add_argument("--version", action="version", version=f"postback-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", metavar="FILE", help="config file (default: $BRIDGE_CONFIG)")

    p = sub.add_parser("serve", help="run the server")
    with_config(p)
    p.add_argument(
        "--log-level", default=os.environ.get("BRIDGE_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("route", help="dry run: where would these postbacks go, and what would be sent")
    with_config(p)
    p.add_argument("postbacks", nargs="+", metavar="POSTBACK.xml")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_route)

    def with_filters(p: argparse.ArgumentParser, limit: int) -> None:
        with_config(p)
        p.add_argument("--destination", metavar="NAME")
        p.add_argument("--event", metavar="EVENT_ID")
        p.add_argument("--since", type=_when, metavar="TIME", help="ISO time, or a duration ago (2h)")
        p.add_argument("--until", type=_when, metavar="TIME")
        p.add_argument("--limit", type=whole_number, default=limit, help=f"at most this many (default {limit})")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("deliveries", help="list deliveries")
    with_filters(p, 100)
    p.add_argument("--status", choices=STATUSES, help="failed: pending after a failed attempt, waiting for its retry")
    p.set_defaults(func=cmd_deliveries)

    p = sub.add_parser(
        "replay", help="send dead and failed deliveries again, now (a new attempt series, same event id)"
    )
    with_filters(p, 1_000_000)
    p.add_argument("ids", nargs="*", type=whole_number, metavar="DELIVERY_ID")
    p.add_argument("--all", action="store_true", help="every dead or failed delivery (within the other filters)")
    p.add_argument("--force", action="store_true", help="also replay delivered ones")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("optouts", help="the opt-out ledger: who opted out of (or back in to) which short code")
    with_config(p)
    p.add_argument("--number", metavar="N", help="only this texter (15551234888 or +15551234888) or short code")
    p.add_argument("--limit", type=whole_number, default=1000, help="at most this many (default 1000)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_optouts)

    p = sub.add_parser("healthcheck", help="exit 0 when the bridge the config describes answers (a HEALTHCHECK)")
    with_config(p)
    p.add_argument("--path", default="/healthz", help="/healthz (default: alive) or /readyz (the store answers)")
    p.add_argument("--timeout", type=float, default=4.0, metavar="SECONDS")
    p.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a reader that has gone is caught below, not at exit
        return code
    except ConfigError as exc:
        _print_errors(exc, getattr(args, "config", None))
        return 1
    except BridgeError as exc:
        print(f"postback-bridge: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            print(f"  caused by: {exc.__cause__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `deliveries | head`: the reader has all it wanted. Python's docs' recipe: stdout goes
        # to /dev/null, or the flush at exit fails again, with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
