"""config.yaml.example documents every option; it must stay valid, and `${VAR}` must work
wherever the contract's own examples put it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.config import load
from bridge.destinations.registry import build as build_destination
from tests.conftest import ROOT

EXAMPLE = ROOT / "config.yaml.example"
ENV = {
    "POSTBACK_TOKEN": "t0ken",
    "POSTBACK_PASSWORD": "pa55",
    "ADMIN_TOKEN": "adm1n",
    "SLACK_BOT_TOKEN": "xoxb-123-456-abc",
    "CRM_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "CRM_TOKEN": "crm-t0ken",
    "SMTP_PASSWORD": "smtp-pa55",
}


def test_check_config_passes_on_the_example_with_its_variables_set():
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(EXAMPLE)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "destinations (4)" in done.stdout and "routes (5)" in done.stdout
    for secret in ENV.values():
        assert secret not in done.stdout + done.stderr


def test_example_without_its_variables_names_each_one_once():
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "check-config", "-c", str(EXAMPLE)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    for name in ENV:
        assert done.stderr.count(f"environment variable {name} is not set") == 1, name


def test_variables_in_flow_mappings_and_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "server:\n"
        "  listen: 127.0.0.1:${PORT}\n"
        "  max_body_bytes: ${MAX_BODY:-4096}\n"
        "  auth: {basic: {username: skycore, password: ${PASS}}}\n"
        "destinations:\n"
        "  hook: {type: webhook, url: 'http://127.0.0.1:9/x', headers: {X-Key: '${KEY}'}, timeout: ${T:-3}}\n"
        "default: [hook]\n"
    )
    config = load(path, {"PORT": "9001", "PASS": "p: {not yaml}", "KEY": "k$$"})
    assert config.server.port == 9001
    assert config.server.max_body_bytes == 4096
    assert config.server.auth.basic.password.reveal() == "p: {not yaml}"
    hook = build_destination(config.destinations["hook"])
    assert hook.headers["X-Key"].reveal() == "k$$"
    assert hook.timeout == 3.0


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server: {max_body_bytes: '${N}'}\n", "server.max_body_bytes"),
        ("server: {listen: 'x:${N}'}\n", "server.listen"),
    ],
)
def test_variable_that_is_not_a_number_where_one_is_needed(tmp_path, text, where):
    from bridge.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path, {"N": "lots"})
    assert any(p.startswith(where) for p in caught.value.problems)
