"""The repository stands alone: a clone of it, with nothing beside it, builds and tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import DATA, POSTBACKS, ROOT, SEEDS, SPID_TABLE

GIT = shutil.which("git")

# A path out of the repository into the project's shared folder, in any spelling code would use.
OUTSIDE = re.compile(r"""\.\./shared|["']shared["']""")


def tracked(*patterns: str) -> list[str]:
    if GIT is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files cannot be listed")
    done = subprocess.run([GIT, "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_no_code_reads_the_shared_folder_beside_the_repository():
    files = tracked("*.py", ".ci/*", "*.toml", "*.cfg", "Dockerfile")
    assert files, "git ls-files found no code"
    readers = [name for name in files if OUTSIDE.search((ROOT / name).read_text(encoding="utf-8"))]
    assert readers == []


def test_the_reference_data_is_in_the_repository():
    assert len(list(POSTBACKS.glob("*.xml"))) >= 8
    assert len(list(SEEDS.glob("*.txt"))) >= 2
    assert SPID_TABLE.stat().st_size > 10_000
    assert all(path.is_relative_to(ROOT) for path in (DATA, POSTBACKS, SEEDS, SPID_TABLE))
    # and it is committed, not just lying in this working tree
    assert set(tracked("tests/data")) >= {f"tests/data/postbacks/{p.name}" for p in POSTBACKS.glob("*.xml")}


@pytest.mark.slow
def test_an_empty_parameter_set_fails_the_run_instead_of_skipping(tmp_path):
    (tmp_path / "test_empty.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.parametrize("x", [])
            def test_nothing(x):
                pass
            """
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_empty.py"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode != 0, done.stdout
    assert "Empty parameter set" in done.stdout
