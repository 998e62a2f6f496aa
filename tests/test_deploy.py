"""What can be checked of the deployment files without a Docker engine."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
import yaml
from docker.utils import build as docker_build
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from yarl import URL

from bridge.cli import _parser
from bridge.metrics import Metrics
from tests.conftest import ROOT, free_port, sms, wait_for_port

DEPLOY = ROOT / "deploy"


def dockerfile() -> DockerfileParser:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    assert parser.structure, "the Dockerfile parses to instructions"
    return parser


def instructions(name: str) -> list[str]:
    return [i["value"] for i in dockerfile().structure if i["instruction"] == name]


def test_dockerfile_is_multi_stage_slim_and_non_root():
    froms = instructions("FROM")
    assert len(froms) >= 2 and all("slim" in f for f in froms)
    assert any(" AS " in f.upper() for f in froms)
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert instructions("EXPOSE") == ["8080"]
    assert instructions("VOLUME")
    (health,) = instructions("HEALTHCHECK")
    assert "/healthz" in health
    env = " ".join(instructions("ENV"))
    assert "BRIDGE_CONFIG=" in env


def test_dockerfile_installs_the_way_the_readme_does():
    readme = (ROOT / "README.md").read_text()
    runs = " ".join(instructions("RUN"))
    assert "pip install ." in runs
    assert "pip install ." in readme


def test_dockerfile_command_is_exec_form_and_one_the_cli_accepts():
    (cmd,) = instructions("CMD")
    argv = json.loads(cmd)  # exec form: the bridge is PID 1 and receives SIGTERM
    assert argv[0] == "postback-bridge"
    args = _parser().parse_args(argv[1:])
    assert args.command == "serve"


def test_dockerfile_pins_its_base_image_to_a_full_version():
    """The same image in both stages, by a full version tag (a digest may follow): a rebuild
    next year does not quietly get another Python or Debian."""
    images = {f.split()[0] for f in instructions("FROM")}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image


def test_dockerfile_installs_the_locked_dependencies_with_their_hashes():
    runs = instructions("RUN")
    (locked,) = [r for r in runs if "requirements.lock" in r]
    assert "--require-hashes" in locked and "-r requirements.lock" in locked
    (project,) = [r for r in runs if "pip install ." in r]
    assert "--no-deps" in project and "pip check" in project  # the project alone, on the locked set
    assert runs.index(locked) < runs.index(project)
    assert any(c.split()[0] == "requirements.lock" for c in instructions("COPY"))


def test_dockerfile_healthcheck_asks_the_configured_address():
    (health,) = instructions("HEALTHCHECK")
    argv = json.loads(health.split(" CMD ", 1)[1])  # exec form: no shell, no curl in the image
    args = _parser().parse_args(argv[1:])
    assert argv[0] == "postback-bridge" and args.command == "healthcheck" and args.path == "/healthz"
    timeout = re.search(r"--timeout=(\d+)s", health)
    assert timeout and args.timeout < int(timeout.group(1))  # it gives up before docker does


@pytest.mark.slow
def test_healthcheck_follows_the_port_in_the_config(bridge_factory):
    """`postback-bridge healthcheck` (the image's HEALTHCHECK) asks server.listen's port, on
    loopback when it listens on every interface; exit 1 once nothing answers there."""
    bridge = bridge_factory({"server": {"auth": {"token": "t" * 20}}})
    config = yaml.safe_load(bridge.config_path.read_text())
    config["server"]["listen"] = f"0.0.0.0:{bridge.port}"  # as the image's config does
    bridge.config_path.write_text(yaml.safe_dump(config))
    bridge.start()
    by_env = {**bridge.env, "BRIDGE_CONFIG": str(bridge.config_path)}
    for args, env in ((["-c", str(bridge.config_path)], bridge.env), ([], by_env)):
        done = subprocess.run(
            [sys.executable, "-m", "bridge", "healthcheck", *args], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
    done = bridge.cli("healthcheck", "-c", str(bridge.config_path), "--path", "/readyz")
    assert done.returncode == 0
    missing = bridge.cli("healthcheck", "-c", str(bridge.config_path), "--path", "/no-such-page", check=False)
    assert missing.returncode == 1 and "answered 404" in missing.stderr
    bridge.stop()
    down = bridge.cli("healthcheck", "-c", str(bridge.config_path), check=False)
    assert down.returncode == 1 and f"127.0.0.1:{bridge.port}/healthz" in down.stderr


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: canonical name -> (version, hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"an option in the lock file: {line}"  # no --index-url, --find-links
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        assert version, f"not pinned with ==: {spec}"
        hashes = [o.removeprefix("--hash=") for o in options if o.startswith("--hash=sha256:")]
        assert hashes and len(hashes) == len(options), f"{name}: every file hashed, nothing else: {options}"
        entries[canonicalize_name(name)] = (version, hashes)
    return entries


def test_lock_file_pins_every_runtime_dependency_of_pyproject():
    """requirements.lock and pyproject.toml cannot drift apart: each dependency is locked at a
    version its specifier allows, and so is each dependency of a locked package."""
    lock = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement.name} (pyproject.toml) is not in requirements.lock: regenerate it"
        version = lock[name][0]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} is not {requirement}"
    # the dependencies of the locked packages, where this environment has that very version
    for name, (version, _) in lock.items():
        try:
            installed = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed.version != version:
            continue
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                needed = canonicalize_name(requirement.name)
                assert needed in lock, f"{needed} (needed by {name}) is not in requirements.lock"


def test_dockerignore_lets_in_what_the_image_copies_and_nothing_private(tmp_path: Path):
    """What docker would send as the build context, by docker's own rules (docker-py's), from a
    tree with the image's inputs and the things a working copy has beside them."""
    copied = {source for c in instructions("COPY") if not c.startswith("--from") for source in c.split()[:-1]}
    assert copied == {"requirements.lock", "pyproject.toml", "README.md", "bridge", "deploy/container-config.yaml"}
    for source in copied | {"Dockerfile", ".dockerignore"}:
        target = tmp_path / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / source, target)
    private = [
        ".venv/lib/python3.11/site-packages/x.py",
        "bridge.db",
        "bridge.db-wal",
        "bridge.db-shm",
        "bridge/bridge.db",
        "data/store.sqlite3",
        ".git/config",
        ".env",
        "bridge/.env",
        "config.yaml",
        "events.jsonl",
        "tests/data/postbacks/sms.xml",
        "bench/results/run.json",
        ".pytest_cache/v/x",
        "bridge/__pycache__/server.cpython-311.pyc",
        "deploy/nginx.conf",
    ]
    for name in private:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("private")
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    context = set(docker_build.exclude_paths(str(tmp_path), patterns))
    assert not context & set(private), context & set(private)
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    wanted = {f for f in files if f not in private}
    assert wanted <= context, wanted - context


def test_container_config_is_valid_and_refuses_without_a_token():
    config = DEPLOY / "container-config.yaml"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(config)],
        env={**env, "POSTBACK_TOKEN": "t"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(config)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and "POSTBACK_TOKEN" in missing.stderr


def test_compose_file_runs_the_bridge_on_its_postgresql():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    bridge, db = compose["services"]["bridge"], compose["services"]["db"]
    assert (DEPLOY / bridge["build"] / "Dockerfile").exists()
    assert db["image"].startswith("postgres:")
    assert bridge["depends_on"]["db"]["condition"] == "service_healthy"
    store = bridge["environment"]["BRIDGE_STORE"]
    assert store.startswith("postgresql://") and "@db:5432/" in store
    # the image's config takes the store from BRIDGE_STORE
    assert "${BRIDGE_STORE:-" in (DEPLOY / "container-config.yaml").read_text()
    assert any(v.endswith(":/var/lib/postgresql/data") for v in db["volumes"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_unit_verifies(tmp_path: Path):
    unit = (DEPLOY / "postback-bridge.service").read_text()
    assert "ExecStart=/opt/postback-bridge/bin/postback-bridge serve" in unit
    # verify needs the binary to exist: point it at this installation's script
    script = Path(sys.executable).parent / "postback-bridge"
    assert script.exists()
    local = tmp_path / "postback-bridge.service"
    local.write_text(unit.replace("/opt/postback-bridge/bin/postback-bridge", str(script)))
    done = subprocess.run(
        [shutil.which("systemd-analyze") or "", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_alert_rules_use_metrics_the_bridge_exports():
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exported = {m.name for m in Metrics().registry.collect()}
    exported |= {f"{name}_total" for name in exported}
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= {word for word in _words(rule["expr"]) if word.startswith("bridge_")}
    assert used and used <= exported, used - exported


def _words(expr: str) -> list[str]:
    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)


# ---------------------------------------------------------------------------- the tools themselves
#
# Each deploy file is run through the tool that reads it, where that tool is installed (.ci/run
# installs nginx, caddy and promtool on Debian). A copy made for a test changes only what a
# machine without root needs changed (certificate and log paths, ports), and says which lines.


def tool(name: str) -> str | None:
    """Where `name` is installed; /usr/sbin too, which a non-root PATH often lacks (nginx)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A deploy file's own tool, run on it: its output, whatever its exit code."""
    return subprocess.run([tool(name) or "", *args], capture_output=True, text=True, check=False, timeout=60)


def localized(path: Path, changes: dict[str, str]) -> str:
    """The deploy file's text with each of `changes` made; each must be in it, so a test never
    checks a copy that silently stopped matching the file as shipped."""
    text = path.read_text()
    for old, new in changes.items():
        assert old in text, f"{path.name} no longer has {old!r}"
        text = text.replace(old, new)
    return text


NGINX_CERT = "/etc/letsencrypt/live/sms.example.com/fullchain.pem"
NGINX_KEY = "/etc/letsencrypt/live/sms.example.com/privkey.pem"
NGINX_ACCESS_LOG = "/var/log/nginx/postback-bridge.access.log"
NGINX_ERROR_LOG = "/var/log/nginx/postback-bridge.error.log"


@dataclass
class Nginx:
    """deploy/nginx.conf in a main config of its own under `prefix`: no root paths, no pid file
    or log outside it. `check()` is `nginx -t`; `start()` runs it in the foreground."""

    prefix: Path
    port: int
    upstream: int
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("sms.example.com", "127.0.0.1")
        self.ca = ca
        cert.cert_chain_pems[0].write_to_path(str(self.prefix / "cert.pem"))
        cert.private_key_pem.write_to_path(str(self.prefix / "key.pem"))
        site = localized(
            DEPLOY / "nginx.conf",
            {
                NGINX_CERT: str(self.prefix / "cert.pem"),
                NGINX_KEY: str(self.prefix / "key.pem"),
                NGINX_ACCESS_LOG: str(self.access_log),
                NGINX_ERROR_LOG: str(self.error_log),
                "listen 443 ssl;": f"listen 127.0.0.1:{self.port} ssl;",
                "proxy_pass http://127.0.0.1:8080;": f"proxy_pass http://127.0.0.1:{self.upstream};",
            },
        )
        (self.prefix / "site.conf").write_text(site)
        temp = " ".join(f"{kind}_temp_path {self.prefix / kind};" for kind in ("client_body", "proxy"))
        temp += " fastcgi_temp_path fcgi; uwsgi_temp_path uwsgi; scgi_temp_path scgi;"
        # as root the workers would run as `nobody`, which cannot enter pytest's 0700 tmp dirs
        user = "user root;" if os.geteuid() == 0 else ""
        (self.prefix / "nginx.conf").write_text(
            f"{user}\npid {self.prefix / 'nginx.pid'};\nerror_log {self.main_error_log};\nevents {{}}\n"
            f"http {{\n  {temp}\n  access_log {self.prefix / 'main-access.log'};\n"
            f"  include {self.prefix / 'site.conf'};\n}}\n"
        )

    @property
    def access_log(self) -> Path:
        return self.prefix / "postback-bridge.access.log"

    @property
    def error_log(self) -> Path:
        return self.prefix / "postback-bridge.error.log"

    @property
    def main_error_log(self) -> Path:
        return self.prefix / "error.log"

    def argv(self, *more: str) -> list[str]:
        nginx = tool("nginx")
        assert nginx is not None
        return [
            nginx,
            "-p",
            str(self.prefix),
            "-e",
            str(self.main_error_log),
            "-c",
            str(self.prefix / "nginx.conf"),
            *more,
        ]

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, check=False, timeout=30)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv("-g", "daemon off;"), stderr=subprocess.PIPE)
        proc = self.proc

        def stderr() -> str:  # once it has exited: reading the pipe of a running nginx would block
            return proc.stderr.read().decode(errors="replace") if proc.stderr and proc.poll() is not None else ""

        wait_for_port(self.port, proc, 10.0, "nginx", stderr)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the logs are flushed
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.prefix.glob("*.log"))

    def client(self) -> aiohttp.ClientSession:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


needs_nginx = pytest.mark.skipif(tool("nginx") is None, reason="nginx is not installed here (.ci/run installs it)")


@needs_nginx
def test_nginx_conf_passes_nginx_t(tmp_path: Path):
    nginx = Nginx(tmp_path, free_port(), 8080)
    done = nginx.check()
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def test_nginx_conf_logs_no_request_line():
    """The access log's format has the path without the token; nothing logs the request line."""
    text = (DEPLOY / "nginx.conf").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for variable in ("$request ", '$request"', "$request'", "$request_uri", "$args", "$query_string", "$arg_token"):
        assert variable not in code, variable
    assert re.findall(r"^\s*access_log\s+(\S+)\s+(\S+);", code, re.M) == [(NGINX_ACCESS_LOG, "postback_bridge")]
    # the server's error log leaves out the `error`-level messages, which name the request
    assert re.findall(r"^\s*error_log\s+(\S+)\s+(\S+);", code, re.M) == [(NGINX_ERROR_LOG, "crit")]


def proxied_bridge(bridge_factory, token: str):
    """The real bridge as it runs behind a proxy on the same host (README, Security)."""
    bridge = bridge_factory(
        {
            "server": {"auth": {"token": token, "trusted_proxies": ["127.0.0.1/32"]}},
            "destinations": {"log": {"type": "log"}},
            "default": ["log"],
        }
    )
    bridge.start()
    return bridge


async def only_postbacks_pass(client: aiohttp.ClientSession, base: str, token: str, bridge) -> None:
    """What a proxy in front of `bridge` at `base` must do: pass postbacks (both token forms),
    Slack's events and GETs of /media/, refuse every other path however it is spelt, refuse a body over 64 KiB (413),
    and answer 502 once the bridge is gone (stopped here: the proxy's error path, which names the
    request)."""

    async def ask(method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        async with client.request(method, URL(base + path, encoded=True), data=body) as r:
            return r.status, await r.read()

    status, body = await ask("POST", f"/postback/{token}", sms(1))
    assert (status, json.loads(body)["status"]) == (200, "accepted")
    status, body = await ask("POST", f"/postback?token={token}", sms(2))
    assert (status, json.loads(body)["status"]) == (200, "accepted")
    assert (await ask("POST", "/postback/not-the-token", sms(3)))[0] == 401
    # Slack's Events API for replies reaches the bridge (which has no such path without replies:
    # its own JSON 404, not the proxy's); nothing else under /slack does
    status, body = await ask("POST", "/slack/events", b'{"type": "url_verification"}')
    assert (status, json.loads(body)) == (404, {"error": "not found"}), body
    for path in ("/slack/events/x", "/slack", "/slack/eventsx"):
        status, body = await ask("POST", path)
        assert status == 404 and b'"error"' not in body, (path, body)
    # kept MMS files by signed link reach it too (this bridge has no `media:`: its JSON 404), GET only
    status, body = await ask("GET", f"/media/{'0' * 64}?expires=1&sig=x")
    assert (status, json.loads(body)) == (404, {"error": "not found"}), body
    for method, path in (("POST", f"/media/{'0' * 64}"), ("GET", "/mediax"), ("DELETE", f"/media/{'0' * 64}")):
        status, body = await ask(method, path)
        assert status in (403, 404, 405) and b'"error"' not in body, (method, path, body)
    # the bridge answers these itself on its own port ...
    async with aiohttp.ClientSession() as direct, direct.get(bridge.url + "/metrics") as r:
        assert r.status == 200 and "bridge_postbacks_received_total" in await r.text()
    # ... and not through the proxy, however the path is spelt
    for path in (
        "/metrics",
        "/admin/deliveries",
        "/admin/events",
        "/healthz",
        f"/{token}",
        "/postback/../metrics",
        "/postback/%2e%2e/metrics",
        "/postback/..%2fmetrics",
        "/postback/%2F..%2Fadmin%2Fdeliveries",
        "//metrics",
        "/Metrics",
    ):
        for method in ("GET", "POST"):
            status, body = await ask(method, path)
            assert status in (401, 403, 404, 405), (method, path, status)
            assert b"bridge_" not in body and b"deliveries" not in body, (method, path)
    assert (await ask("POST", f"/postback/{token}", b"x" * 70_000))[0] == 413
    bridge.stop()  # the upstream is gone: the proxy answers 502, and says so in its error log
    assert (await ask("POST", f"/postback/{token}", sms(4)))[0] == 502
    # the two postbacks reached the bridge once each
    assert sum(1 for line in bridge.log_lines() if line.get("msg") == "postback accepted") == 2


@needs_nginx
async def test_nginx_in_front_of_the_bridge_passes_postbacks_only_and_logs_no_token(tmp_path: Path, bridge_factory):
    token = "tok" + secrets.token_hex(16)
    bridge = proxied_bridge(bridge_factory, token)
    proxy_dir = tmp_path / "nginx"
    proxy_dir.mkdir()
    nginx = Nginx(proxy_dir, free_port(), bridge.port)
    nginx.start()
    try:
        async with nginx.client() as client:
            await only_postbacks_pass(client, f"https://127.0.0.1:{nginx.port}", token, bridge)
    finally:
        nginx.stop()
    access = nginx.access_log.read_text()
    assert '"POST /postback/- HTTP/1.1" 200' in access
    assert '"POST /postback HTTP/1.1" 200' in access
    assert '"POST /postback/- HTTP/1.1" 413' in access and '"POST /postback/- HTTP/1.1" 502' in access
    assert token not in nginx.logs(), "the postback token is in an nginx log"


# ---------------------------------------------------------------------------- caddy

needs_caddy = pytest.mark.skipif(tool("caddy") is None, reason="caddy is not installed here (.ci/run installs it)")


def caddy_env(home: Path) -> dict[str, str]:
    """Caddy keeps certificates and an autosaved config under its data and config folders:
    those of the test, not root's."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config")}  # fmt: skip


@needs_caddy
def test_caddyfile_passes_caddy_validate(tmp_path: Path):
    done = subprocess.run(
        [tool("caddy") or "", "validate", "--config", str(DEPLOY / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=caddy_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "Valid configuration" in done.stdout + done.stderr


@needs_caddy
async def test_caddy_in_front_of_the_bridge_passes_postbacks_only_and_logs_no_token(tmp_path: Path, bridge_factory):
    token = "tok" + secrets.token_hex(16)
    bridge = proxied_bridge(bridge_factory, token)
    port = free_port()
    # plain HTTP on a loopback port: Caddy's automatic HTTPS needs a public name
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(
        localized(
            DEPLOY / "Caddyfile",
            {
                "\nsms.example.com {": f"\nhttp://127.0.0.1:{port} {{",
                "reverse_proxy 127.0.0.1:8080": f"reverse_proxy 127.0.0.1:{bridge.port}",
            },
        )
    )
    caddy, env = tool("caddy") or "", caddy_env(tmp_path)
    adapted = subprocess.run(
        [caddy, "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
        capture_output=True, text=True, check=True, timeout=60, env=env,
    )  # fmt: skip
    config = json.loads(adapted.stdout)
    config["admin"] = {"disabled": True}  # no admin endpoint on localhost:2019 (shared by every test run)
    (tmp_path / "caddy.json").write_text(json.dumps(config))
    log = tmp_path / "caddy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [caddy, "run", "--config", str(tmp_path / "caddy.json")], stdout=out, stderr=out, env=env
        )
    try:
        wait_for_port(port, proc, 10.0, "caddy", lambda: log.read_text(errors="replace"))
        async with aiohttp.ClientSession() as client:
            await only_postbacks_pass(client, f"http://127.0.0.1:{port}", token, bridge)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "http.log.error" in text, "the 502 was logged (with the request, its URI filtered)"
    assert token not in text, "the postback token is in Caddy's log"


# ---------------------------------------------------------------------------- promtool

needs_promtool = pytest.mark.skipif(
    tool("promtool") is None, reason="promtool is not installed here (.ci/run installs Debian's prometheus)"
)


@needs_promtool
def test_alert_rules_pass_promtool_check_rules():
    done = run_tool("promtool", "check", "rules", str(DEPLOY / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests():
    """tests/promtool/alerts.test.yml: the dead-deliveries alert fires for a first death in a
    series shown at 0, for a series born with its deaths, after a restart; not for old ones."""
    done = run_tool("promtool", "test", "rules", str(ROOT / "tests" / "promtool" / "alerts.test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_dead_deliveries_alert_counts_every_way_to_die():
    """Not the attempts' outcome="dead", which misses deaths in the queue and by removal."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    (dead,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "PostbackBridgeDeadDeliveries"]
    assert "bridge_deliveries_died_total" in dead["expr"] and "outcome=" not in dead["expr"]
    assert "reason" in dead["expr"]


# ---------------------------------------------------------------------------- systemd


def offline_security_supported() -> bool:
    """`systemd-analyze security --offline=` came in systemd 250 (Debian 12 has 252)."""
    analyze = tool("systemd-analyze")
    if analyze is None:
        return False
    done = subprocess.run([analyze, "security", "--help"], capture_output=True, text=True, check=False, timeout=30)
    return "--offline" in done.stdout


@pytest.mark.skipif(
    not offline_security_supported(), reason="no systemd-analyze with security --offline (systemd 250+)"
)
def test_systemd_unit_is_rated_under_3_by_systemd_analyze_security():
    done = run_tool("systemd-analyze", "security", "--offline=true", str(DEPLOY / "postback-bridge.service"))
    found = re.search(r"Overall exposure level for postback-bridge\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) < 3.0, done.stdout


def test_systemd_unit_keeps_what_the_bridge_needs():
    """Hardened, it must still run the bridge: its store under StateDirectory, its port, and
    connections out to PostgreSQL, SMTP and HTTPS (IPv4, IPv6, a Unix socket)."""
    settings: dict[str, list[str]] = {}
    for line in (DEPLOY / "postback-bridge.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    assert settings["StateDirectory"] == ["postback-bridge"]
    assert settings["WorkingDirectory"] == ["/var/lib/postback-bridge"]
    assert settings["ProtectSystem"] == ["strict"]  # so the state directory is the one writable place
    assert set(settings["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "PrivateNetwork" not in settings and "IPAddressDeny" not in settings
    assert settings["User"] == ["postback-bridge"]
