"""moec tune's error paths on a CPU machine, and tuning tables flowing from a spec into the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moec.cli import main
from moec.errors import UsageError
from moec.plan.tuning import load_tuning

ROOT = Path(__file__).resolve().parent.parent
TABLE = {
    "gpu": "test",
    "dtype": "float32",
    "tables": [
        {
            "hidden": 16,
            "ffn": 8,
            "experts": 4,
            "top_k": 2,
            "buckets": {
                "1": {
                    "up": {"block_m": 16, "block_n": 16, "block_k": 16},
                    "down": {"block_m": 16, "block_n": 16, "block_k": 16},
                }
            },
        }
    ],
}


def test_tune_without_a_gpu_is_a_clear_error(capsys):
    code = main(["tune", str(ROOT / "specs/examples/hetero_small.yaml"), "-o", "/tmp/never.json"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err


def test_bad_tables_are_refused(tmp_path):
    bad = json.loads(json.dumps(TABLE))
    bad["tables"][0]["buckets"]["1"]["up"]["block_m"] = 12  # not a power of 2
    (tmp_path / "t.json").write_text(json.dumps(bad))
    with pytest.raises(UsageError, match="block_m"):
        load_tuning(tmp_path / "t.json")


def test_spec_tuning_table_reaches_the_package(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from moec.spec import load_spec

    (tmp_path / "tuning.json").write_text(json.dumps(TABLE))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        "name: tuned\nhidden: 16\ndtype: fp32\nexperts: [{count: 4, ffn: 8}]\nrouter: {top_k: 2}\n"
        "kernels: {tuning: tuning.json}\n"
    )
    spec, _ = load_spec(spec_path)
    from moec.codegen import generate
    from tests.genutil import write_files

    folder = write_files(generate(spec, base_dir=tmp_path), tmp_path / "pkg" / "tuned_pkg")
    assert "(16, 8, 4, 2)" in (folder / "tuning.py").read_text()
    import importlib
    import sys

    sys.path.insert(0, str(folder.parent))
    pkg = importlib.import_module("tuned_pkg")
    layer = pkg.MoELayer()
    x = torch.randn(5, 16)
    layer.backend = "torch"
    y_torch = layer(x)
    layer.backend = "triton"
    torch.testing.assert_close(layer(x), y_torch, atol=1e-4, rtol=1e-4)
    kernels = pkg.backend.kernels()
    assert (16, 8, 4, 2) in kernels.ops._CONFIG_TABLES
