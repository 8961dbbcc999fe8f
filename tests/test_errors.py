"""Bad specs are golden too: each tests/errors/<case>.yaml has its exact message in <case>.expected.

Accept intended message changes with ``pytest tests/test_errors.py --update-golden``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moec.cli import main

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted((ROOT / "tests" / "errors").glob("*.yaml"))


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_error_message(case, capsys, monkeypatch, request):
    monkeypatch.chdir(ROOT)
    code = main(["check", str(case.relative_to(ROOT))])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    expected = case.with_suffix(".expected")
    if request.config.getoption("--update-golden"):
        expected.write_text(err)
        return
    assert err == expected.read_text(), f"message changed for {case.name}:\n{err}"


def test_build_writes_nothing_on_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "pkg"
    code = main(["build", "tests/errors/top_k_too_large.yaml", "-o", str(out)])
    assert code == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
