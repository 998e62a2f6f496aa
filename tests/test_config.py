"""The YAML config (CONTRACT §3) and the `check-config` and `route` commands (CONTRACT §2).

Every invalid case is its own small file under testdata/config/invalid/, Alertmanager style;
its `# expect:` lines are the errors it must produce, each with its place, and no others.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bridge.carriers import Carriers
from bridge.config import ConfigError, build, defaults, expand_env, load
from bridge.destinations.registry import build as build_destination
from bridge.validate import parse_duration
from tests.conftest import POSTBACKS, ROOT

TESTDATA = Path(__file__).resolve().parent / "testdata" / "config"
INVALID = sorted((TESTDATA / "invalid").glob("*.yml"))
VALID = sorted((TESTDATA / "valid").glob("*.yml"))
ENV = {
    "POSTBACK_TOKEN": "s3cret-token",
    "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "CRM_TOKEN": "crm-token",
}


def expected_errors(path: Path) -> list[str]:
    return [line.split("# expect:", 1)[1].strip() for line in path.read_text().splitlines() if "# expect:" in line]


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_config(path):
    expected = expected_errors(path)
    assert expected, f"{path.name} says no `# expect:` error"
    with pytest.raises(ConfigError) as caught:
        load(path, environ=ENV)
    problems = caught.value.problems
    for want in expected:
        assert any(want in problem for problem in problems), f"{want!r} not in {problems}"
    assert len(problems) == len(expected), problems


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_config(path):
    config = load(path, environ=ENV)
    assert config.source == str(path)


def test_full_config_values():
    config = load(TESTDATA / "valid" / "full.yml", environ=ENV)
    server = config.server
    assert (server.host, server.port, server.postback_path) == ("127.0.0.1", 8099, "/skycore/postback")
    assert server.auth.token is not None and server.auth.token.reveal() == "s3cret-token"
    assert server.admin_token is not None and server.admin_token.reveal() == "changeme"  # ${ADMIN_TOKEN:-changeme}
    assert server.lane is False and defaults().server.lane is True
    assert config.store == "sqlite:////var/lib/postback-bridge/bridge.db"
    assert (config.retry.initial, config.retry.max_interval, config.retry.max_age) == (0.5, 600.0, 86400.0)
    crm = config.destinations["crm"]
    assert (crm.retry.initial, crm.retry.max_interval, crm.retry.max_age) == (0.5, 600.0, 72 * 3600.0)
    assert config.destinations["events"].retry == config.retry
    assert build_destination(config.destinations["events"]).url == "http://127.0.0.1:9000/events"
    assert (crm.options.client, config.destinations["events"].options.client) == ("builtin", "aiohttp")
    assert [r.name for r in config.routes] == ["opt-out", "contest", "main-shortcode", "sprint", "quiet"]
    assert [r.continue_ for r in config.routes] == [False, True, False, False, False]
    assert config.routes[2].match.shortcode == ("86717", "74700")  # YAML's number 86717 is the short code
    assert config.routes[3].match.spid == ("0001650",)
    assert config.routes[4].to == ()
    assert config.default == ("audit",)


def test_secrets_do_not_show_in_repr():
    config = load(TESTDATA / "valid" / "full.yml", environ=ENV)
    assert "s3cret-token" not in repr(config.server)


def test_unquoted_spids_keep_their_leading_zeros():
    config = load(TESTDATA / "valid" / "full.yml", environ=ENV)
    assert dict(config.carriers) == {"0009999": "Local Telco", "0001470": "AT&T Mobility"}
    carriers = Carriers(config.carriers)
    assert carriers.lookup("0009999") == "Local Telco"
    assert carriers.lookup("0001470") == "AT&T Mobility"  # overrides the built-in name
    assert carriers.lookup("0001650") == "Sprint"  # the built-in table stays


def test_empty_file_is_an_empty_config():
    config = load(TESTDATA / "valid" / "empty.yml", environ={})
    assert config.destinations == {} and config.routes == () and config.default is None
    assert (config.server.host, config.server.port, config.server.postback_path) == ("127.0.0.1", 8080, "/postback")
    assert config.server.max_body_bytes == 65536


def test_max_body_bytes_has_no_floor_beyond_one_byte():
    assert load(TESTDATA / "valid" / "small_max_body.yml", environ={}).server.max_body_bytes == 100


def test_only_true_and_false_are_booleans_as_in_yaml_1_2():
    config = load(TESTDATA / "valid" / "yaml12_booleans.yml", environ={})
    assert config.routes[0].match.keyword == ("YES", "NO", "ON", "OFF", "Y", "N", "YES", "ON")
    assert [r.continue_ for r in config.routes] == [True, False]
    assert config.destinations["inbox"].options.thread_by_sender is True
    assert config.destinations["inbox"].ordered is True  # one thread per texter: in order
    assert yaml.safe_load("a: yes") == {"a": True}  # PyYAML's own loader is left alone


def test_match_spid_is_zero_padded_like_the_carrier_table(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text('routes:\n  - match: {spid: [1470, "1650", 0001470, 01470, " 502 ", X1]}\n    to: []\n')
    config = load(path, environ={})
    assert config.routes[0].match.spid == ("0001470", "0001650", "0001470", "0001470", "0000502", "X1")


def test_builtin_defaults_send_everything_to_log():
    config = defaults()
    assert config.default == ("log",)
    assert config.destinations["log"].type == "log"
    assert config.store == "sqlite:///bridge.db"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "nope.yml")
    assert "cannot read" in str(caught.value)


# ---------------------------------------------------------------------------- values

DURATIONS = [
    ("500ms", 0.5),
    ("1s", 1.0),
    ("10m", 600.0),
    ("24h", 86400.0),
    ("30d", 30 * 86400.0),
    ("1h30m", 5400.0),
    ("1.5s", 1.5),
    (" 2m ", 120.0),
    (0, 0.0),
    (90, 90.0),
    (2.5, 2.5),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1 s", "5 minutes", "1x", "s", "-1s", "1s2", "ms", True, -5])
def test_bad_duration(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


ENV_CASES = [
    ("${A}", {"A": "x"}, "x", []),
    ("${A:-d}", {"A": "x"}, "x", []),
    ("${A:-d}", {}, "d", []),
    ("${A:-d}", {"A": ""}, "d", []),  # set but empty takes the default, as in the shell
    ("${A}", {"A": ""}, "", []),
    ("${A:-}", {}, "", []),
    ("${A}", {}, "", ["A"]),
    ("Bearer ${A}/${B}", {"A": "1", "B": "2"}, "Bearer 1/2", []),
    ("${A}${B}", {}, "", ["A", "B"]),
    ("$$A and $${A}", {"A": "x"}, "$A and ${A}", []),
    ("price: $5", {}, "price: $5", []),
    ("${A:-http://h:8080/p}", {}, "http://h:8080/p", []),
]


@pytest.mark.parametrize(("text", "environ", "expanded", "missing"), ENV_CASES)
def test_expand_env(text, environ, expanded, missing):
    assert expand_env(text, environ) == (expanded, missing)


def test_env_values_are_not_parsed_as_yaml():
    config = build(
        {"destinations": {"audit": {"type": "log", "path": "${P}"}}, "default": ["audit"]},
        environ={"P": "a: b # not yaml"},
    )
    assert config.destinations["audit"].options.path == "a: b # not yaml"


def test_yaml_numbers_are_read_as_the_digits_written():
    raw = yaml.safe_dump({"routes": [{"match": {"shortcode": [86717], "code": "N211"}, "to": []}]})
    config = build(yaml.safe_load(raw), environ={})
    assert config.routes[0].match.shortcode == ("86717",)


def test_match_keyword_is_upper_cased_and_a_single_value_is_a_list():
    config = build({"routes": [{"match": {"keyword": " stop ", "origin": "SMS_MO"}, "to": []}]}, environ={})
    assert config.routes[0].match.keyword == ("STOP",)
    assert config.routes[0].match.origin == ("SMS_MO",)


# ---------------------------------------------------------------------------- the commands


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "BRIDGE_CONFIG"}
    full_env.update({"PYTHONPATH": str(ROOT), **ENV, **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_ok_prints_a_summary(tmp_path):
    done = run_cli("check-config", "-c", str(TESTDATA / "valid" / "full.yml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "destinations (3)" in out and "routes (5)" in out
    for name in ("crm [webhook]", "events [webhook]", "audit [log]", "opt-out:", "main-shortcode:"):
        assert name in out
    assert "quiet: " in out and "nothing (drop)" in out
    assert "default -> audit" in out
    assert "crm-token" not in out and "s3cret-token" not in out and "whsec_" not in out


def test_check_config_lists_every_error_with_its_place_and_exits_1(tmp_path):
    path = TESTDATA / "invalid" / "every_error_at_once.yml"
    done = run_cli("check-config", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 1
    assert "5 errors" in done.stderr
    for want in expected_errors(path):
        assert want in done.stderr
    assert "Traceback" not in done.stderr


def test_check_config_reads_bridge_config_and_needs_a_file(tmp_path):
    done = run_cli("check-config", cwd=tmp_path, env={"BRIDGE_CONFIG": str(TESTDATA / "valid" / "minimal.yml")})
    assert done.returncode == 0, done.stderr
    assert "minimal.yml: ok" in done.stdout
    done = run_cli("check-config", cwd=tmp_path)
    assert done.returncode == 1
    assert "-c FILE" in done.stderr and "BRIDGE_CONFIG" in done.stderr


def test_check_config_says_which_way_slack_replies_come_when_both_are_given(tmp_path):
    config = {
        "destinations": {
            "sms": {"type": "skycore", "api_key": "k"},
            "inbox": {
                "type": "slack",
                "token": "xoxb-1",
                "channel": "#sms-inbox",
                "replies": {"send_with": "sms", "signing_secret": "shh", "app_token": "xapp-1"},
            },
        },
        "default": ["inbox"],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("check-config", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "no Request URL needed" not in out  # it would be, were Socket Mode off in the app
    assert "the bridge takes both; Slack sends each event one way: over the socket while Socket Mode is on" in out
    assert "Request URL (Event Subscriptions), used only while Socket Mode is off: https://" in out


async def test_route_is_a_dry_run(tmp_path, sink):
    config = {
        "store": f"sqlite:///{tmp_path / 'bridge.db'}",
        "destinations": {
            "crm": {"type": "webhook", "url": sink.url + "/hook", "secret": "${CRM_WEBHOOK_SECRET}"},
            "audit": {"type": "log"},
        },
        "routes": [
            {"name": "opt-out", "match": {"keyword": "stop"}, "to": ["crm"], "continue": True},
            {"name": "main", "match": {"shortcode": "86717"}, "to": ["audit", "crm"]},
        ],
    }
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    args = ["route", "-c", str(path), "--json", str(POSTBACKS / "sms_mo_transactionid.xml")]
    done = await asyncio.to_thread(run_cli, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (report,) = json.loads(done.stdout)  # a list, also for one file
    assert report["event"]["type"] == "sms.received" and report["event"]["from"] == "+15552312102"
    assert report["routes"] == ["opt-out", "main"]
    assert {name: send["via"] for name, send in report["destinations"].items()} == {"crm": "opt-out", "audit": "main"}
    assert report["destinations"]["crm"]["would_send"]  # what the webhook would be sent
    assert "whsec_" not in done.stdout  # secrets masked in the preview

    text = await asyncio.to_thread(run_cli, *[a for a in args if a != "--json"], cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "routes matched: opt-out, main" in text.stdout and "-> crm [webhook] via opt-out" in text.stdout

    await asyncio.sleep(0.2)
    assert sink.received == []  # nothing delivered
    assert not (tmp_path / "bridge.db").exists()  # nothing stored


def test_route_of_an_unmatched_event_and_of_a_non_postback(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<html><body>nope</body></html>")
    mms = str(POSTBACKS / "mms_mo_v1.3.xml")
    done = run_cli("route", "-c", str(TESTDATA / "valid" / "full.yml"), mms, str(bad), cwd=tmp_path)
    assert done.returncode == 1
    assert "bad.xml: not a postback: root element is <html>" in done.stderr
    assert "routes matched: main-shortcode" in done.stdout  # the good file is still reported

    done = run_cli(
        "route", "-c", str(TESTDATA / "valid" / "full.yml"), "--json", mms, str(bad), "gone.xml", cwd=tmp_path
    )
    assert done.returncode == 1
    good, not_xml, missing = json.loads(done.stdout)  # an entry per file, in order, errors too
    assert good["file"] == mms and good["routes"] == ["main-shortcode"]
    assert not_xml == {"file": str(bad), "error": "not a postback: root element is <html>, expected <POSTBACK>"}
    assert missing["file"] == "gone.xml" and missing["error"].startswith("cannot read: ")


def test_output_into_a_pipe_closed_early_is_no_traceback(tmp_path):
    """`postback-bridge route ... | head`: head exits after its lines; the rest is not an error
    worth a traceback."""
    files = [str(POSTBACKS / "mms_mo_v1.3.xml")] * 200
    producer = subprocess.Popen(
        [sys.executable, "-m", "bridge", "route", "-c", str(TESTDATA / "valid" / "full.yml"), "--json", *files],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert producer.stdout is not None and producer.stderr is not None
    producer.stdout.read(100)  # what `head -c 100` reads, then it is gone
    producer.stdout.close()
    stderr = producer.stderr.read().decode()
    producer.wait(60)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


# ---------------------------------------------------------------------------- warnings


@pytest.mark.parametrize(
    ("server", "warned", "this_machine"),
    [
        ({"auth": {"trusted_proxies": ["127.0.0.1/32"]}}, True, True),
        ({"auth": {"trusted_proxies": ["::1"]}}, True, True),
        ({"auth": {"trusted_proxies": ["10.0.0.0/8"]}}, True, False),
        ({"auth": {"trusted_proxies": ["127.0.0.1/32"]}, "admin_token": "adm"}, False, False),
        ({"auth": {"trusted_proxies": ["127.0.0.1/32"]}, "admin_token": "${ADMIN_TOKEN:-}"}, True, True),  # empty: none
        ({"auth": {"allow_from": ["10.0.0.0/8"]}}, False, False),
        ({}, False, False),
    ],
)
def test_trusted_proxies_without_an_admin_token_is_warned_about(server, warned, this_machine):
    warnings = build({"server": server}, environ={}).warnings()
    assert len(warnings) == int(warned), warnings
    if warned:
        (text,) = warnings
        assert text.startswith("server.admin_token: not set, while server.auth.trusted_proxies")
        assert ("this machine" in text) == this_machine, text


def test_check_config_prints_warnings_and_still_exits_0(tmp_path):
    path = tmp_path / "proxied.yml"
    config = {"server": {"auth": {"trusted_proxies": ["127.0.0.1/32"]}}, "store": "sqlite:///x.db"}
    path.write_text(yaml.safe_dump(config))
    done = run_cli("check-config", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{path}: ok" in done.stdout
    assert f"{path}: 1 warning:\n  - server.admin_token: not set, while server.auth.trusted_proxies" in done.stderr
    config["server"]["admin_token"] = "${ADMIN_TOKEN}"
    path.write_text(yaml.safe_dump(config))
    done = run_cli("check-config", "-c", str(path), cwd=tmp_path, env={"ADMIN_TOKEN": "adm"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
