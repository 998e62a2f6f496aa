"""The YAML config file -> a validated, immutable Config (CONTRACT §3).

Strict like Alertmanager's: unknown keys, wrong types, undefined destinations and unset
`${VAR}`s are errors, and every error is reported at once with its place
(`routes[2].match.keyword`).

This module only parses the file, fills in `${VAR}`s, validates and cross-checks. The Config it
makes is plain frozen data: each destination is a DestinationSpec whose options its own module
validated (`parse`); the running bridge builds the live destinations from them
(`bridge.destinations.registry.build`). Nothing here opens a connection or holds a client.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from bridge.carriers import spid_key
from bridge.destinations.base import DestinationSpec
from bridge.destinations.registry import registry
from bridge.digits import parse_uint
from bridge.errors import ConfigError
from bridge.event import TYPES, phone
from bridge.retry import RetryPolicy
from bridge.routing import Match, Route
from bridge.secret import Secret, redact_url
from bridge.validate import EnvStr, Reader, Unset, item_place, join, kind_of, suggest, unset_message

# ---------------------------------------------------------------------------- values

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PLACEHOLDER = re.compile(r"__bridge_env_(\d+)__")


def protect_env(text: str) -> tuple[str, list[str]]:
    """Swap each `${...}` in YAML source for a plain placeholder before parsing, so that
    `{password: ${PASS}}` (a flow mapping) parses and no variable's value is read as YAML."""
    found: list[str] = []

    def sub(m: re.Match[str]) -> str:
        found.append(m.group(0))
        return f"__bridge_env_{len(found) - 1}__"

    return _ENV.sub(sub, text), found


def restore_env(value: Any, found: list[str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: found[int(m.group(1))], value) if "__bridge_env_" in value else value
    if isinstance(value, dict):
        return {restore_env(k, found): restore_env(v, found) for k, v in value.items()}
    if isinstance(value, list):
        return [restore_env(v, found) for v in value]
    return value


def expand_env(value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """`${VAR}` and `${VAR:-default}` substituted, `$$` -> `$`; also the names left unset."""
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in environ and (environ[name] or default is None):
            return environ[name]
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _ENV.sub(sub, value), missing


# ---------------------------------------------------------------------------- model


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: Secret


@dataclass(frozen=True)
class AuthConfig:
    token: Secret | None = None
    basic: BasicAuth | None = None
    allow_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_unauthenticated: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.token or self.basic or self.allow_from)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    postback_path: str = "/postback"
    max_body_bytes: int = 65536
    client_timeout: float = 30.0
    auth: AuthConfig = field(default_factory=AuthConfig)
    admin_token: Secret | None = None
    lane: bool = True  # bridge.lane in front of aiohttp; false: aiohttp alone (the way back)

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class Retention:
    delivered: float = 30 * 86400.0
    dead: float = 90 * 86400.0


_LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

MEDIA_DESTINATION = "~media"  # the internal destination of the media fetch step (bridge.media.step)
MIB = 1024 * 1024
# The bridge's own destinations (durable internal work through the outbox): their names start
# with `~`, which a configured destination's name cannot, so no route can ever name one.
INTERNAL_PREFIX = "~"
FEEDBACK = "~feedback"  # what a reply's thread shows (reactions, lines): bridge.replies
FEEDBACK_REPORT = "report"  # the route of its deliveries for SMS delivery reports (a TRACKINGID)
REPLY_ROUTE = "replies"  # the route a reply's delivery to its SMS destination is stored under


@dataclass(frozen=True)
class S3Settings:
    """`media.s3`: how to reach an S3-compatible server (AWS's own when nothing is given)."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None


@dataclass(frozen=True)
class MediaConfig:
    """`media:` (CONTRACT §9): where MMS files are kept, and the limits of fetching them."""

    store: str  # file:///abs/dir or s3://bucket/prefix
    public_url: str  # how readers reach this bridge: archived_url is {public_url}/media/<sha256>?...
    s3: S3Settings = field(default_factory=S3Settings)
    max_bytes: int = 5 * MIB
    keep: float = 90 * 86400.0
    wait: float = 120.0
    timeout: float = 30.0
    allow_private: bool = False
    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    link_ttl: float | None = None  # None: as long as the file is kept
    secret: Secret | None = None  # None: a random key kept in the store (shared by its instances)

    @property
    def link_lifetime(self) -> float:
        return self.keep if self.link_ttl is None else self.link_ttl


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    store: str
    carriers: Mapping[str, str]
    retry: RetryPolicy
    destinations: Mapping[str, DestinationSpec]
    routes: tuple[Route, ...]
    default: tuple[str, ...] | None
    retention: Retention = field(default_factory=Retention)
    source: str | None = None  # the file it came from
    media: MediaConfig | None = None

    @cached_property
    def internal(self) -> frozenset[str]:
        """The bridge's own destinations this config needs (names start with `~`; no route names
        one): `~media` with a `media:` section, `~feedback` when a Slack destination takes
        replies. Their pending deliveries are not "to a removed destination"."""
        names = {MEDIA_DESTINATION} if self.media is not None else set()
        if any(getattr(spec.options, "replies", None) is not None for spec in self.destinations.values()):
            names.add(FEEDBACK)
        return frozenset(names)

    def warnings(self) -> list[str]:
        """What is allowed but probably not meant, each with its place as errors have it:
        `check-config` prints them, `serve` logs them at start."""
        found = []
        auth = self.server.auth
        if auth.trusted_proxies and self.server.admin_token is None:
            # A proxy is in front. Without a token, what keeps the admin API (phone numbers, texts,
            # replay) from the internet is only the proxy's headers and its address (admin.guard).
            local = [str(net) for net in auth.trusted_proxies if any(address in net for address in _LOOPBACK)]
            message = (
                "server.admin_token: not set, while server.auth.trusted_proxies says a proxy is in front. Without"
                " it /admin answers only requests made directly on loopback, and tells those from proxied ones"
                " by the proxy's headers (Forwarded, X-Forwarded-For, X-Real-IP) and address alone: set"
                " server.admin_token"
            )
            if local:
                message += f" (trusted_proxies has {', '.join(local)}, this machine: /admin refuses its requests too)"
            found.append(message)
        return found


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _construct_int(loader: _StrictLoader, node: yaml.ScalarNode) -> int:
    """A YAML integer, within 20 digits: none of ours is longer, and int() of one past 4,300
    digits raises ValueError, which is no YAMLError (a traceback where a config error was meant)."""
    digits = sum("0" <= c <= "9" for c in str(loader.construct_scalar(node)))
    if digits > 20:
        raise yaml.constructor.ConstructorError(None, None, f"a number of {digits} digits", node.start_mark)
    return int(yaml.SafeLoader.construct_yaml_int(loader, node))


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
# YAML 1.1 reads an unquoted 0001470 as the octal number 824: SPIDs and short codes with leading
# zeros stay the digits the user wrote.
_StrictLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_StrictLoader.yaml_implicit_resolvers["0"].insert(0, ("tag:yaml.org,2002:str", re.compile(r"^0[0-9_]+$")))
# YAML 1.1 also reads yes/no/on/off (any case) as booleans, so `keyword: [YES, NO, On]` would be
# an error. As in YAML 1.2's core schema, only true/false (True, TRUE, False, FALSE) are booleans;
# the rest stay the strings the user wrote (and `continue: yes` is a type error naming its place).
_BOOL = "tag:yaml.org,2002:bool"
for _first, _resolvers in _StrictLoader.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != _BOOL]
    if _first and _first in "tTfF":
        _resolvers.insert(0, (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")))


def _interpolate(value: Any, path: str, environ: Mapping[str, str], r: Reader) -> Any:
    if isinstance(value, str):
        text, missing = expand_env(value, environ)
        if missing:
            text = Unset(text)
            text.names = tuple(missing)
        elif _ENV.fullmatch(value) and value != "$$":
            text = EnvStr(text)
        for name in missing:
            r.error(path, unset_message(name))
        return text
    if isinstance(value, dict):
        return {k: _interpolate(v, join(path, str(k)), environ, r) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", environ, r) for i, v in enumerate(value)]
    return value


# ---------------------------------------------------------------------------- sections

_TOP = frozenset({"server", "store", "carriers", "retry", "destinations", "routes", "default", "retention", "media"})
_MEDIA = frozenset(
    {
        "store", "s3", "max_bytes", "keep", "wait", "timeout", "allow_private", "allow_networks", "public_url",
        "link_ttl", "secret",
    }
)  # fmt: skip
_S3 = frozenset({"endpoint_url", "region", "access_key_id", "secret_access_key"})
_SERVER = frozenset({"listen", "postback_path", "max_body_bytes", "client_timeout", "auth", "admin_token", "lane"})
_AUTH = frozenset({"token", "basic", "allow_from", "trusted_proxies", "allow_unauthenticated"})
_RETRY = frozenset({"initial", "max_interval", "max_age"})
_ROUTE = frozenset({"name", "match", "to", "continue"})
_MATCH = frozenset({"origin", "type", "code", "keyword", "shortcode", "from", "text", "spid", "carrier"})
COMMON_DESTINATION_KEYS = frozenset({"type", "retry", "concurrency"})

DEFAULT_STORE = "sqlite:///bridge.db"


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    port = parse_uint(port_text, max_digits=5)
    if not sep or port is None or not 0 < port < 65536:
        raise ValueError(f"{text!r} is not host:port (like 0.0.0.0:8080)")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 (":8080" means every interface, as in Go)
    return host, port


def _server(raw: Any, r: Reader) -> ServerConfig:
    data = r.mapping(raw, "server", _SERVER)
    if not data:
        return ServerConfig()
    kwargs: dict[str, Any] = {}
    listen_known = auth_known = True  # whether the auth check below can tell
    if "listen" in data:
        listen_known = False
        text = r.string(data["listen"], "server.listen")
        if text is not None:
            try:
                kwargs["host"], kwargs["port"] = parse_listen(text)
                listen_known = True
            except ValueError as exc:
                r.error("server.listen", str(exc))
    if "postback_path" in data:
        path = r.string(data["postback_path"], "server.postback_path")
        if path is not None:
            if not path.startswith("/") or len(path) < 2 or "{" in path or path.endswith("/"):
                r.error("server.postback_path", f"{path!r} must be a path like /postback")
            elif any(c in path for c in "%?#") or not path.isprintable() or " " in path:
                # aiohttp matches the decoded path without its query: /p%41 would be /pA, /a?b /a
                r.error("server.postback_path", f"{path!r} must be a plain path: no %, ?, # or spaces")
            elif path.startswith("/admin/"):  # /admin/reload would be the admin API's, or no one's
                r.error("server.postback_path", f"{path!r} is under /admin/, which is the admin API's")
            else:
                kwargs["postback_path"] = path
    if "max_body_bytes" in data:
        kwargs["max_body_bytes"] = r.integer(data["max_body_bytes"], "server.max_body_bytes", minimum=1)
    if "client_timeout" in data:
        kwargs["client_timeout"] = r.duration(data["client_timeout"], "server.client_timeout")
    if "auth" in data:
        errors_before = len(r.errors)
        kwargs["auth"] = _auth(data["auth"], r)
        auth_known = len(r.errors) == errors_before  # a broken token is not a missing one
    if "admin_token" in data and data["admin_token"] != "":  # `${ADMIN_TOKEN:-}`: no admin API off loopback
        kwargs["admin_token"] = r.secret(data["admin_token"], "server.admin_token")
    if "lane" in data:
        kwargs["lane"] = r.boolean(data["lane"], "server.lane")
    server = ServerConfig(**{k: v for k, v in kwargs.items() if v is not None})
    if listen_known and auth_known and not server.loopback:
        _require_auth(server, r)
    return server


def _require_auth(server: ServerConfig, r: Reader) -> None:
    """A public listen needs auth: reported with the other errors, not only when it is the last one."""
    if server.auth.configured or server.auth.allow_unauthenticated:
        return
    r.error(
        "server.auth",
        f"is required to listen on {server.host}:{server.port} (not loopback): anyone could post. Set "
        "server.auth.token (and point Skycore at /postback/<token>), server.auth.basic or "
        "server.auth.allow_from; or listen on 127.0.0.1 behind a proxy; or set "
        "server.auth.allow_unauthenticated: true if something in front already guards it",
    )


def _auth(raw: Any, r: Reader) -> AuthConfig:
    data = r.mapping(raw, "server.auth", _AUTH)
    if not data:
        return AuthConfig()
    kwargs: dict[str, Any] = {}
    if "token" in data:
        kwargs["token"] = r.secret(data["token"], "server.auth.token")
    if "basic" in data:
        basic = r.mapping(data["basic"], "server.auth.basic", {"username", "password"}, {"username", "password"})
        if basic and {"username", "password"} <= set(basic):
            user = r.string(basic["username"], "server.auth.basic.username")
            password = r.secret(basic["password"], "server.auth.basic.password")
            if user is not None and ":" in user:
                r.error("server.auth.basic.username", "must not contain ':'")
            elif user is not None and password is not None:
                kwargs["basic"] = BasicAuth(user, password)
    if "allow_from" in data:
        kwargs["allow_from"] = r.networks(data["allow_from"], "server.auth.allow_from")
    if "trusted_proxies" in data:
        kwargs["trusted_proxies"] = r.networks(data["trusted_proxies"], "server.auth.trusted_proxies")
    if "allow_unauthenticated" in data:
        kwargs["allow_unauthenticated"] = r.boolean(data["allow_unauthenticated"], "server.auth.allow_unauthenticated")
    return AuthConfig(**{k: v for k, v in kwargs.items() if v is not None})


def parse_retry(raw: Any, path: str, base: RetryPolicy, r: Reader) -> RetryPolicy:
    data = r.mapping(raw, path, _RETRY)
    if not data:
        return base
    values = {
        key: r.duration(data[key], join(path, key)) for key in ("initial", "max_interval", "max_age") if key in data
    }
    merged = {
        "initial": base.initial,
        "max_interval": base.max_interval,
        "max_age": base.max_age,
        **{k: v for k, v in values.items() if v is not None},
    }
    if merged["initial"] > merged["max_interval"]:
        r.error(path, "initial must not be longer than max_interval")
    return RetryPolicy(**merged)


def _store(raw: Any, r: Reader) -> str:
    if raw is None:
        return DEFAULT_STORE
    text = r.string(raw, "store")
    if text is None:
        return DEFAULT_STORE
    if not (text.startswith("sqlite:///") or text.startswith(("postgresql://", "postgres://"))):
        r.error("store", f"{redact_url(text)!r} is not sqlite:///PATH or postgresql://...{_store_hint(text)}")
    return text


def _store_hint(text: str) -> str:
    """What to write instead, when the value is a bare filesystem path."""
    if ":" in text:
        return ""
    if text.startswith("/"):
        return f"; an absolute path is sqlite:///{text} (four slashes)"
    return f"; a path relative to the working directory is sqlite:///{text} (three slashes)"


def _carriers(raw: Any, r: Reader) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        r.error("carriers", f"expected a mapping of SPID to carrier name, got {kind_of(raw)}")
        return {}
    out = {}
    for spid, name in raw.items():
        spid_text = r.string(spid, f"carriers.{spid}")
        name_text = r.string(name, f"carriers.{spid}")
        if spid_text is not None and name_text is not None:
            out[spid_text] = name_text
    return out


def _retention(raw: Any, r: Reader) -> Retention:
    data = r.mapping(raw, "retention", {"delivered", "dead"})
    if not data:
        return Retention()
    values = {k: r.duration(data[k], f"retention.{k}") for k in ("delivered", "dead") if k in data}
    return Retention(**{k: v for k, v in values.items() if v is not None})


def _media_store(raw: Any, store: str, r: Reader) -> str | None:
    """`media.store` as a URL: `file:///abs/dir` or `s3://bucket/prefix`. By default a `media`
    directory beside a SQLite store's file."""
    if raw is None:
        if not store.startswith("sqlite:///"):
            r.error(
                "media.store",
                "is required with a PostgreSQL store: every instance must reach the same files"
                " (s3://bucket/prefix, or file:///a/shared/directory)",
            )
            return None
        directory = os.path.dirname(os.path.abspath(store.removeprefix("sqlite:///")))
        return "file://" + os.path.join(directory, "media")
    text = r.string(raw, "media.store")
    if text is None:
        return None
    if text.startswith("file://"):
        path = text.removeprefix("file://")
        if not path.startswith("/"):
            r.error("media.store", f"{text!r}: a file store needs an absolute path, like file:///var/lib/bridge/media")
            return None
        return text
    if text.startswith("s3://"):
        bucket = text.removeprefix("s3://").split("/", 1)[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            r.error("media.store", f"{text!r}: {bucket!r} is not an S3 bucket name (3-63 of a-z, 0-9, '.', '-')")
            return None
        return text
    r.error("media.store", f"{redact_url(text)!r} is not file:///PATH or s3://BUCKET/PREFIX")
    return None


def _s3(raw: Any, r: Reader) -> S3Settings:
    data = r.mapping(raw, "media.s3", _S3)
    if not data:
        return S3Settings()
    kwargs: dict[str, Any] = {}
    if "endpoint_url" in data:
        kwargs["endpoint_url"] = r.url(data["endpoint_url"], "media.s3.endpoint_url")
    if "region" in data:
        kwargs["region"] = r.string(data["region"], "media.s3.region")
    for key in ("access_key_id", "secret_access_key"):
        if key in data:
            kwargs[key] = r.secret(data[key], f"media.s3.{key}")
    if ("access_key_id" in data) != ("secret_access_key" in data):
        missing = "secret_access_key" if "access_key_id" in data else "access_key_id"
        r.error(f"media.s3.{missing}", "is required with " + ({"access_key_id", "secret_access_key"} - {missing}).pop())
    return S3Settings(**{k: v for k, v in kwargs.items() if v is not None})


def _media(raw: Any, store: str, server: ServerConfig, r: Reader) -> MediaConfig | None:
    """`media:` (CONTRACT §9); only called when the section is there (`media:` alone: the defaults)."""
    data = r.mapping(raw, "media", _MEDIA)
    if data is None:
        return None
    errors_before = len(r.errors)
    location = _media_store(data.get("store"), store, r)
    kwargs: dict[str, Any] = {}
    if "s3" in data:
        if location is not None and not location.startswith("s3://"):
            r.error("media.s3", "is for an s3:// store")
        kwargs["s3"] = _s3(data["s3"], r)
    if "max_bytes" in data:
        kwargs["max_bytes"] = r.integer(data["max_bytes"], "media.max_bytes", minimum=1)
    for key in ("keep", "wait", "timeout", "link_ttl"):
        if key in data:
            kwargs[key] = r.duration(data[key], f"media.{key}")
    if "allow_private" in data:
        kwargs["allow_private"] = r.boolean(data["allow_private"], "media.allow_private")
    if "allow_networks" in data:
        kwargs["allow_networks"] = r.networks(data["allow_networks"], "media.allow_networks")
    if "secret" in data:
        kwargs["secret"] = r.secret(data["secret"], "media.secret")
        if kwargs["secret"] is not None and len(kwargs["secret"].reveal()) < 16:
            r.error("media.secret", "is too short to sign links with: use 16 characters or more (32 random bytes)")
    public_url = None
    if "public_url" in data:
        public_url = r.url(data["public_url"], "media.public_url")
        if public_url is not None and (URL(public_url).query_string or URL(public_url).fragment):
            r.error("media.public_url", f"{public_url!r}: a base URL like https://bridge.example.com, no ? or #")
            public_url = None
    elif server.loopback:
        host = f"[{server.host}]" if ":" in server.host else server.host
        public_url = f"http://{host}:{server.port}"
    else:
        r.error(
            "media.public_url",
            f"is required to listen on {server.host}:{server.port} (not loopback): the https:// address readers"
            " reach this bridge by, for the archived files' links (/media/... must be passed on by the proxy)",
        )
    if len(r.errors) > errors_before or location is None or public_url is None:
        return None
    return MediaConfig(
        store=location, public_url=public_url.rstrip("/"), **{k: v for k, v in kwargs.items() if v is not None}
    )


def _destinations(raw: Any, retry: RetryPolicy, r: Reader) -> dict[str, DestinationSpec]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        r.error("destinations", f"expected a mapping of name to destination, got {kind_of(raw)}")
        return {}
    out: dict[str, DestinationSpec] = {}
    types = registry()
    for name, spec in raw.items():
        path = f"destinations.{name}"
        if isinstance(name, str) and name.startswith(INTERNAL_PREFIX):
            r.error(
                path,
                f"a name starting with '{INTERNAL_PREFIX}' is the bridge's own ({MEDIA_DESTINATION}: fetching MMS"
                f" files; {FEEDBACK}: what a reply's thread shows); choose another",
            )
            continue
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            r.error(path, "a destination name uses letters, digits, '_', '-' and '.' only")
            continue
        if not isinstance(spec, dict):
            r.error(path, f"expected a mapping with a type, got {kind_of(spec)}")
            continue
        kind = spec.get("type")
        if kind is None:
            r.error(f"{path}.type", f"is required (one of: {', '.join(sorted(types))})")
            continue
        cls = types.get(kind) if isinstance(kind, str) else None
        if cls is None:
            r.error(f"{path}.type", f"unknown destination type {kind!r} (one of: {', '.join(sorted(types))})")
            continue
        r.mapping(spec, path, COMMON_DESTINATION_KEYS | cls.config_keys, cls.required_keys | {"type"})
        policy = parse_retry(spec.get("retry"), f"{path}.retry", retry, r) if "retry" in spec else retry
        concurrency = cls.default_concurrency
        if "concurrency" in spec:
            concurrency = r.integer(spec["concurrency"], f"{path}.concurrency", minimum=1) or concurrency
        options = {k: v for k, v in spec.items() if k not in COMMON_DESTINATION_KEYS}
        errors_before = len(r.errors)
        parsed = cls.parse(options, path, r)
        if parsed is not None and len(r.errors) == errors_before:
            out[name] = DestinationSpec(name, kind, policy, concurrency, cls.is_ordered(parsed), parsed)
    return out


def _match(raw: Any, path: str, r: Reader) -> Match:
    data = r.mapping(raw, path, _MATCH)
    if not data:
        return Match()
    kwargs: dict[str, Any] = {}
    for key in ("origin", "type", "code", "shortcode", "spid", "carrier"):
        if key in data:
            kwargs[key] = r.strings(data[key], f"{path}.{key}")
    for i, kind in enumerate(kwargs.get("type") or ()):
        if kind not in TYPES:  # a typo would pass and silently never match
            where = item_place(f"{path}.type", data["type"], i)
            close = suggest(kind, TYPES)
            hint = f"did you mean {close!r}? " if close else ""
            r.error(where, f"unknown event type {kind!r} ({hint}types: {', '.join(sorted(TYPES))})")
    if kwargs.get("spid"):
        # `spid: 1470` is the carrier table's 0001470, as the event's SPID is (routing.matches)
        kwargs["spid"] = tuple(spid_key(spid) for spid in kwargs["spid"])
    if kwargs.get("shortcode"):
        # a long code written as Skycore sends it (15551234567) matches the event's +15551234567
        kwargs["shortcode"] = tuple(phone(code.strip()) or code for code in kwargs["shortcode"])
    if "keyword" in data:
        words = r.strings(data["keyword"], f"{path}.keyword")
        kwargs["keyword"] = tuple(w.strip().upper() for w in words) if words is not None else None
    if "from" in data:
        kwargs["from_"] = r.strings(data["from"], f"{path}.from")
    if "text" in data:
        patterns = r.strings(data["text"], f"{path}.text") or ()
        compiled = []
        for i, pattern in enumerate(patterns):
            try:
                compiled.append(re.compile(pattern, re.IGNORECASE))
            except re.error as exc:
                where = item_place(f"{path}.text", data["text"], i)
                r.error(where, f"invalid regular expression {pattern!r}: {exc}")
        kwargs["text"] = tuple(compiled)
    return Match(**{k: v for k, v in kwargs.items() if v is not None})


def _destination_list(raw: Any, path: str, declared: set[str], r: Reader) -> tuple[str, ...]:
    names = r.strings(raw, path)
    if names is None:
        return ()
    for i, name in enumerate(names):
        if name not in declared:
            where = item_place(path, raw, i)
            r.error(
                where,
                f"undefined destination {name!r}"
                + (f" (defined: {', '.join(sorted(declared))})" if declared else " (no destinations are defined)"),
            )
    return names


def _routes(raw: Any, declared: set[str], r: Reader) -> tuple[Route, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.error("routes", f"expected a list of routes, got {kind_of(raw)}")
        return ()
    routes = []
    names: set[str] = set()
    for i, spec in enumerate(raw):
        path = f"routes[{i}]"
        data = r.mapping(spec, path, _ROUTE, {"to"})
        if data is None:
            continue
        name = r.string(data["name"], f"{path}.name") if "name" in data else f"routes[{i}]"
        if name in names:
            r.error(f"{path}.name", f"duplicate route name {name!r}")
        names.add(name or "")
        match = _match(data.get("match"), f"{path}.match", r)
        to = _destination_list(data["to"], f"{path}.to", declared, r) if "to" in data else ()
        cont = r.boolean(data["continue"], f"{path}.continue") if "continue" in data else False
        routes.append(Route(name=name or f"routes[{i}]", match=match, to=to, continue_=bool(cont)))
    return tuple(routes)


def _check_replies(destinations: Mapping[str, DestinationSpec], raw: Any, raw_routes: Any, r: Reader) -> None:
    """`replies.send_with` (CONTRACT §7) names a destination of type skycore; and no route of
    the config's takes the name a reply's SMS is stored under (REPLY_ROUTE), or its deliveries
    would be taken for replies' (a thread told about them, their reports matched)."""
    if any(getattr(spec.options, "replies", None) is not None for spec in destinations.values()):
        for i, route in enumerate(raw_routes if isinstance(raw_routes, list) else []):
            if isinstance(route, dict) and route.get("name") == REPLY_ROUTE:
                r.error(
                    f"routes[{i}].name",
                    f"{REPLY_ROUTE!r} is the route name replies from Slack are stored under: name this route otherwise",
                )
    for name, spec in destinations.items():
        replies = getattr(spec.options, "replies", None)
        if replies is None:
            continue
        place = f"destinations.{name}.replies.send_with"
        target = destinations.get(replies.send_with)
        declared = isinstance(raw, dict) and replies.send_with in raw
        if target is None and not declared:
            r.error(place, f"no destination named {replies.send_with!r}: name one of type skycore")
        elif target is not None and target.type != "skycore":
            r.error(
                place, f"{replies.send_with!r} is of type {target.type}: replies are sent with a skycore destination"
            )


def build(raw: Any, environ: Mapping[str, str] | None = None, source: str | None = None) -> Config:
    """A Config from parsed YAML, or ConfigError listing every problem."""
    r = Reader()
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"the config file must be a mapping, got {kind_of(raw)}"])
    raw = _interpolate(raw, "", environ, r)
    r.mapping(raw, "", _TOP)
    server = _server(raw.get("server"), r)
    retry = parse_retry(raw.get("retry"), "retry", RetryPolicy(), r) if "retry" in raw else RetryPolicy()
    destinations = _destinations(raw.get("destinations"), retry, r)
    declared = set(raw["destinations"]) if isinstance(raw.get("destinations"), dict) else set()
    routes = _routes(raw.get("routes"), declared, r)
    default = _destination_list(raw["default"], "default", declared, r) if raw.get("default") is not None else None
    _check_replies(destinations, raw.get("destinations"), raw.get("routes"), r)
    store = _store(raw.get("store"), r)
    config = Config(
        server=server,
        store=store,
        carriers=_carriers(raw.get("carriers"), r),
        retry=retry,
        destinations=destinations,
        routes=routes,
        default=default,
        retention=_retention(raw.get("retention"), r),
        source=source,
        media=_media(raw.get("media"), store, server, r) if "media" in raw else None,
    )
    if r.errors:
        raise ConfigError(list(dict.fromkeys(r.errors)))  # an unset variable is seen twice
    return config


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    text, found = protect_env(text)
    try:
        raw = restore_env(yaml.load(text, Loader=_StrictLoader), found)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}: invalid YAML at {where}: {problem}"]) from None
    return build(raw, environ, source=str(path))


def defaults() -> Config:
    """What `serve` runs with no config file: every event to the log destination."""
    return build({"destinations": {"log": {"type": "log"}}, "default": ["log"]}, environ={})
