"""The documentation: the site in docs/ builds strictly (every page in the nav, every link and
anchor found), and the README stays a short front page whose links all lead somewhere and whose
copied parts say what the docs say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"

RUN_IT = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/postback-bridge serve"
TEST_IT = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"

# A Markdown link or image: [text](target) or [text](target "title").
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def section(text: str, heading: str) -> str:
    """A `## heading` section of a Markdown text, up to the next `## ` heading outside a fence."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f"## {heading}\n")
    inside = False
    for end in range(start + 1, len(lines)):
        if lines[end].lstrip().startswith("```"):
            inside = not inside
        elif not inside and lines[end].startswith("## "):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif not inside and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(github_slug(m[1]))
    return found


def mkdocs(*args: str) -> subprocess.CompletedProcess[str]:
    # A proxy that refuses every connection: a build that tried to fetch a font or an asset
    # would fail (and --strict turns a plugin's warning about it into a failure too).
    env = {
        **os.environ,
        "NO_MKDOCS_2_WARNING": "1",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "ALL_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def nav_files(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def test_the_site_builds_strictly_and_offline(tmp_path: Path):
    site = tmp_path / "site"
    done = mkdocs("build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site))
    assert done.returncode == 0, done.stderr
    pages = sorted(p.relative_to(DOCS) for p in DOCS.rglob("*.md"))
    for page in pages:
        html = site / ("index.html" if page.name == "index.md" else page.with_suffix("") / "index.html")
        assert html.is_file(), f"{page} was not built"
    # bench/README.md is the site's Performance page (pymdownx.snippets includes it)
    assert "bench/run.py" in (site / "performance" / "index.html").read_text(encoding="utf-8")
    # nothing is fetched when a reader opens a page either: no web fonts, no CDN
    for html in site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html
        assert not re.search(r"<(?:script|link)[^>]+(?:src|href)=\"(?:https?:)?//", text), html


def test_every_page_in_docs_is_in_the_nav():
    from mkdocs.config import load_config

    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    config = load_config(str(ROOT / "mkdocs.yml"))
    in_nav = nav_files(config["nav"])
    assert len(in_nav) == len(set(in_nav)), "a page is in the nav twice"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(in_nav) == pages


def test_the_readme_is_under_15_kb():
    assert README.stat().st_size < 15_000


@pytest.mark.parametrize("name", ["README.md", "bench/README.md"])
def test_every_relative_link_in_the_readmes_leads_to_a_file_and_heading_that_exist(name: str):
    path = ROOT / name
    links = LINK.findall(path.read_text(encoding="utf-8"))
    relative = [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link)]
    if name == "README.md":
        assert any(link.startswith("docs/") for link in relative), "the README links to no docs page"

    def leads_somewhere(link: str) -> bool:
        file, _, anchor = link.partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.exists() or not target.is_relative_to(ROOT):
            return False
        return not anchor or (target.suffix == ".md" and anchor in anchors(target))

    assert [link for link in relative if not leads_somewhere(link)] == []


def test_the_readme_keeps_the_two_newcomer_commands_verbatim():
    readme = README.read_text(encoding="utf-8")
    assert f"```sh\n{RUN_IT}\n```" in section(readme, "Run it")
    assert f"```sh\n{TEST_IT}\n```" in section(readme, "Test it")
    assert "`.ci/run` is how CI runs it" in section(readme, "Test it")
    assert "mkdocs serve" in readme


@pytest.mark.parametrize("heading", ["Run it", "Test it", "Quickstart"])
def test_the_getting_started_page_says_what_the_readme_says(heading: str):
    """The README's newcomer sections are copied to docs/getting-started.md, links aside (the
    README's go to docs/...)."""
    readme = section(README.read_text(encoding="utf-8"), heading).replace("](docs/", "](")
    page = section((DOCS / "getting-started.md").read_text(encoding="utf-8"), heading)
    assert readme.strip() == page.strip()


def test_the_how_it_works_page_has_the_readme_diagram_and_module_map():
    """Every block of the README's How it works (the flow diagram, the paragraph under it, the
    module map) is on docs/how-it-works.md, except the README's pointers into the docs."""
    readme = section(README.read_text(encoding="utf-8"), "How it works")
    page = (DOCS / "how-it-works.md").read_text(encoding="utf-8")
    blocks = [b.strip() for b in re.split(r"\n\s*\n", readme.split("\n", 1)[1]) if b.strip()]
    assert any(b.startswith("| module | job |") for b in blocks)
    missing = [b for b in blocks if "](docs/" not in b and b not in page]
    assert missing == []


def test_the_readme_performance_table_is_the_latest_run_in_bench_readme():
    table = [line for line in section(README.read_text(encoding="utf-8"), "Performance").splitlines() if line]
    bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    rows = [line for line in table if line.startswith("|")]
    assert len(rows) >= 3
    assert "\n".join(rows) in bench
    (run,) = (line for line in table if line.startswith("Run "))
    assert run in bench
