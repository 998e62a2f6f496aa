"""What can be checked of the deployment files without a Docker engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from bridge.cli import _parser
from bridge.metrics import Metrics
from tests.conftest import ROOT

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
    import re

    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
