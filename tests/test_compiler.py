"""Properties of the compiler itself: it never imports torch, it refuses oversized specs, and it is
fast enough to run on every save."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from moec.errors import SpecError
from moec.spec.loader import MAX_SPEC_BYTES, load_text

ROOT = Path(__file__).resolve().parent.parent


def test_the_compiler_never_imports_torch(tmp_path):
    code = f"""
import sys
from moec.cli import main
rc = main(["build", "{ROOT}/specs/examples/hetero_small.yaml", "-o", "{tmp_path}/out"])
rc |= main(["plan", "{ROOT}/specs/examples/hetero_small.yaml", "--json"])
assert rc == 0, rc
bad = [m for m in ("torch", "triton", "transformers") if m in sys.modules]
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_oversized_spec_is_refused():
    text = "name: big\nhidden: 64\n" + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1)
    try:
        load_text(text, "big.yaml")
    except SpecError as exc:
        assert "larger than" in str(exc)
    else:
        raise AssertionError("an oversized spec was accepted")


def test_many_aliases_are_refused_before_expansion():
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    try:
        load_text(bomb, "bomb.yaml")
    except SpecError as exc:
        assert "anchors and aliases" in str(exc)
    else:
        raise AssertionError("an alias bomb was accepted")
