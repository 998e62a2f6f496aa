"""The README's Quickstart, as a newcomer copies it: its sample postback and its config file are
taken from the README itself, so the two cannot drift apart from what the product does."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import yaml

from tests.conftest import ROOT, post
from tests.test_config import run_cli


def quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Quickstart") : readme.index("## How it works")]


def heredoc(marker: str) -> str:
    """The text of `cat > FILE <<'MARKER'` ... `MARKER` in the README's Quickstart."""
    found = re.search(rf"<<'{marker}'\n(.*?)\n *{marker}\n", quickstart(), re.DOTALL)
    assert found, f"no <<'{marker}' heredoc in the Quickstart"
    return textwrap.dedent(found.group(1)) + "\n"


def test_the_quickstart_config_checks_and_routes_the_quickstart_postback(tmp_path: Path):
    (tmp_path / "sms.xml").write_text(heredoc("XML"))
    (tmp_path / "config.yaml").write_text(heredoc("YAML"))
    checked = run_cli("check-config", "-c", "config.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    routed = run_cli("route", "-c", "config.yaml", "sms.xml", cwd=tmp_path)
    assert routed.returncode == 0, routed.stderr
    assert "routes matched: opt-out" in routed.stdout and "-> crm [webhook]" in routed.stdout
    assert not (tmp_path / "bridge.db").exists()  # a dry run


async def test_the_quickstart_postback_is_accepted_once_then_a_duplicate(bridge_factory, sink):
    config = yaml.safe_load(heredoc("YAML"))
    config["destinations"]["crm"]["url"] = sink.url + "/skycore"  # "your CRM's URL"
    bridge = bridge_factory(config)
    bridge.start()
    body = heredoc("XML").encode()
    status, first = await post(bridge.url + "/postback", body)
    assert status == 200 and first["status"] == "accepted"
    status, again = await post(bridge.url + "/postback", body)
    assert (status, again) == (200, {"status": "duplicate", "id": first["id"]})
    (received,) = await sink.wait_for(1)
    assert received.path == "/skycore" and received.json()["keyword"] == "STOP"
    # step 2's "a new TRANSACTIONID": the README's sed command, applied as sed would
    found = re.search(
        r"sed 's/([^/]+)/([^/]+)/' sms\.xml \| curl --data-binary @- localhost:8080/postback", quickstart()
    )
    assert found, "no sed line in the Quickstart"
    status, new = await post(bridge.url + "/postback", body.replace(found[1].encode(), found[2].encode(), 1))
    assert status == 200 and new["status"] == "accepted" and new["id"] != first["id"]
    (_, second) = await sink.wait_for(2)
    assert second.json()["id"] == new["id"]
