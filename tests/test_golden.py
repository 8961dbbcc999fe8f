"""generated/ is the golden set: every spec under specs/ regenerates to exactly the bytes committed.

On a mismatch the test prints the diff; accept an intended change with

    pytest tests/test_golden.py --update-golden
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moec.codegen import build_files, writer

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted(p.relative_to(ROOT) for p in (ROOT / "specs").rglob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the specs are named relative to it (headers do not depend on it)


def test_there_are_goldens():
    assert len(SPECS) >= 1


@pytest.mark.parametrize("spec_path", SPECS, ids=[p.stem for p in SPECS])
def test_golden(spec_path, request):
    spec, out, files = build_files(spec_path)
    if request.config.getoption("--update-golden"):
        writer.write_package(out, files, force=True, prune=True)
        return
    text = writer.diff(out, files)
    on_disk = {
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    expected = set(files) | {writer.MANIFEST}
    assert not text, f"{out} differs from what {spec_path} generates:\n{text[:20000]}\n" + (
        "accept with: pytest tests/test_golden.py --update-golden"
    )
    assert on_disk == expected, f"stale or missing files in {out}: {sorted(on_disk ^ expected)}"


def test_every_golden_package_has_a_spec():
    names = {build_files(p)[0].name for p in SPECS}
    packages = {p.name for p in (ROOT / "generated").iterdir() if p.is_dir()}
    assert packages <= names, f"generated/ holds packages with no spec: {sorted(packages - names)}"
