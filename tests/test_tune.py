"""``moec tune`` on a CPU: its error paths, the table validation, and a tuned build end to end.

The tuned build runs the generated layer's Triton backend under TRITON_INTERPRET=1 with a tiny
hand-written table and compares it with the torch backend.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # see tests/conftest.py

import pytest  # noqa: E402

from moec.cli import main  # noqa: E402
from moec.errors import UsageError  # noqa: E402
from moec.plan.tuning import load_tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEC = """name: tuned_tiny
hidden: 32
dtype: fp32
experts: [{count: 4, ffn: 16}]
router: {top_k: 2, normalize: sum}
kernels: {tuning: tiles.json}
"""
GEMM = {"block_m": 16, "block_n": 16, "block_k": 16, "group_m": 1, "num_warps": 4, "num_stages": 2}
TABLE = {
    "gpu": "hand-written",
    "dtype": "float32",
    "tables": [
        {"hidden": 32, "ffn": 16, "experts": 4, "top_k": 2,
         "buckets": {"1": {"up": GEMM, "down": GEMM},
                     "64": {"up": dict(GEMM, block_m=32), "down": GEMM}}},
    ],
}  # fmt: skip


def write(tmp_path: Path, table=TABLE, spec=SPEC) -> Path:
    (tmp_path / "tiles.json").write_text(json.dumps(table))
    (tmp_path / "spec.yaml").write_text(spec)
    return tmp_path / "spec.yaml"


def test_no_gpu_is_a_usage_error(tmp_path, capsys):
    rc = main(["tune", str(write(tmp_path)), "-o", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "no CUDA GPU" in err or "cannot import torch" in err
    assert not (tmp_path / "t.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "16,x"], "--tokens: expected positive integers"),
        (["--tokens", "0"], "--tokens: expected positive integers"),
        (["--python", "/nonexistent/python"], "--python: cannot run"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    rc = main(["tune", str(write(tmp_path)), "-o", str(tmp_path / "t.json"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err


def test_python_without_torch(tmp_path, capsys):
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nexec {sys.executable} -I -S "$@"\n')
    fake.chmod(0o755)
    rc = main(["tune", str(write(tmp_path)), "-o", str(tmp_path / "t.json"), "--python", str(fake)])
    assert rc == 2 and "cannot import torch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "table, message",
    [
        ({"tables": {}}, "expected an object with a list 'tables'"),
        ({"tables": [{"hidden": 32}]}, "malformed entry"),
        ({"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": GEMM}})]}, "malformed entry"),
        (
            {"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": dict(GEMM, block_m=24),
                                                                "down": GEMM}})]},
            "power of 2",
        ),
        (
            {"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": dict(GEMM, tile=1),
                                                                "down": GEMM}})]},
            "fields must be",
        ),
    ],
)  # fmt: skip
def test_load_tuning_rejects(tmp_path, table, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(table))
    with pytest.raises(UsageError, match=message):
        load_tuning(path)


def test_load_tuning_reads_the_committed_table():
    (shape, buckets), *_ = load_tuning(ROOT / "bench/tuning/qwen3_30b_a3b_h100.json")
    assert shape == (2048, 768, 128, 8)
    assert [b for b, _ in buckets] == [16, 256, 4096, 16384]


def test_tuned_build_registers_the_table(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from moec.codegen import build_files, writer

    spec_path = write(tmp_path)
    spec, _, files = build_files(spec_path, tmp_path / "pkg" / "tuned_tiny")
    writer.write_package(tmp_path / "pkg" / "tuned_tiny", files)
    sys.path.insert(0, str(tmp_path / "pkg"))
    try:
        import tuned_tiny
        import tuned_tiny.tuning

        assert tuned_tiny.tuning.CONFIGS[(32, 16, 4, 2)][64]["up"]["block_m"] == 32
        k = tuned_tiny.backend.kernels()
        table = k.ops._CONFIG_TABLES[(32, 16, 4, 2)]
        assert k.pick_config(100, 32, 16, 4, 2, torch.float32, table).up.block_m == 32
        torch.manual_seed(0)
        layer = tuned_tiny.MoELayer(backend="triton")
        ref = tuned_tiny.MoELayer(backend="torch")
        ref.load_state_dict(layer.state_dict())
        for T in (3, 70):  # one token count in each bucket
            x = torch.randn(T, 32)
            torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    finally:
        sys.path.remove(str(tmp_path / "pkg"))
