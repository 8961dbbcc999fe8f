"""``moec tune`` on a CPU: its error paths, the table validation, and a tuned build end to end.

The tuned build runs the generated layer's Triton backend under TRITON_INTERPRET=1 with a tiny
hand-written table and compares it with the torch backend.
"""

from __future__ import annotations

import importlib
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


def kernel_module(name: str):
    """``moe_kernels.<name>`` of the kernel library every package copies (imported from the source)."""
    sys.path.insert(0, str(ROOT / "moec/templates/kernels_src"))
    try:
        return importlib.import_module(f"moe_kernels.{name}")
    finally:
        sys.path.remove(str(ROOT / "moec/templates/kernels_src"))


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
                     "64": {"up": dict(GEMM, block_m=32, fold_m=16), "down": GEMM}}},
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
        ({"tables": [dict(TABLE["tables"][0], weights="int3")]}, r"weights: must be one of"),
        (
            {"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": dict(GEMM, tail_div=3),
                                                                "down": GEMM}})]},
            r"up\.tail_div: must be one of \[2, 4\]",
        ),
        (
            {"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": GEMM,
                                                                "down": dict(GEMM, fold_m=48)}})]},
            r"down\.fold_m: must be one of \[0, 16, 32, 64\]",
        ),
        (
            {"tables": [dict(TABLE["tables"][0], buckets={"1": {"up": dict(GEMM, fold_m=True),
                                                                "down": GEMM}})]},
            r"up\.fold_m: must be one of",
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
    assert shape == (2048, 768, 128, 8, "dense")  # written before "weights" existed: dense
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

        assert tuned_tiny.tuning.CONFIGS[(32, 16, 4, 2, "dense")][64]["up"]["block_m"] == 32
        k = tuned_tiny.backend.kernels()
        table = k.ops._CONFIG_TABLES[(32, 16, 4, 2, "dense")]
        up = k.pick_config(100, 32, 16, 4, 2, torch.float32, table).up
        assert (up.block_m, up.fold_m) == (32, 16)  # the up GEMM folds tails of <= 16 rows
        torch.manual_seed(0)
        layer = tuned_tiny.MoELayer(backend="triton")
        ref = tuned_tiny.MoELayer(backend="torch")
        ref.load_state_dict(layer.state_dict())
        for T in (3, 70):  # one token count in each bucket
            x = torch.randn(T, 32)
            torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    finally:
        sys.path.remove(str(tmp_path / "pkg"))


MIXED_SPEC = """name: tuned_mixed
hidden: 32
dtype: fp32
experts:
  - {name: dense, count: 4, ffn: 16}
  - {name: q8, count: 4, ffn: 16, dtype: int8}
router: {top_k: 2, normalize: sum}
kernels: {tuning: tiles.json}
"""
MIXED_TABLE = {
    "gpu": "hand-written",
    "dtype": "float32",
    "tables": [
        dict(TABLE["tables"][0], weights="dense"),
        {"hidden": 32, "ffn": 16, "experts": 4, "top_k": 2, "weights": "int8",
         "buckets": {"1": {"up": dict(GEMM, block_n=32), "down": dict(GEMM, block_k=32)}}},
    ],
}  # fmt: skip


def test_groups_of_one_shape_and_different_weight_formats_get_their_own_tiles(
    tmp_path, monkeypatch
):
    """A bf16 and an int8 group of the same (H, F, E, K) are separate tuning entries: the tuner
    lists both, the build registers both, and each call picks the table of its weights' format."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from moec.codegen import build_files, writer

    spec_path = write(tmp_path, MIXED_TABLE, MIXED_SPEC)
    spec, _, files = build_files(spec_path, tmp_path / "pkg" / "tuned_mixed")
    writer.write_package(tmp_path / "pkg" / "tuned_mixed", files)
    sys.path.insert(0, str(tmp_path / "pkg"))
    try:
        import tuned_mixed
        from tuned_mixed.kernels import ops, tune

        shapes = tune.plan_shapes(tuned_mixed.PLAN)
        assert [s["shape"] for s in shapes] == [(32, 16, 4, 2, "dense"), (32, 16, 4, 2, "int8")]
        assert shapes[1]["dtype"] == torch.bfloat16  # quantised groups: tuned with bf16 activations
        k = tuned_mixed.backend.kernels()
        assert set(k.ops._CONFIG_TABLES) == {(32, 16, 4, 2, "dense"), (32, 16, 4, 2, "int8")}

        picked = []
        pick = ops.pick_config
        monkeypatch.setattr(ops, "pick_config", lambda *a: picked.append(a[6]) or pick(*a))
        torch.manual_seed(0)
        layer = tuned_mixed.MoELayer(backend="triton")
        ref = tuned_mixed.MoELayer(backend="torch")
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(5, 32)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
        assert sorted(t[1]["up"]["block_n"] for t in picked) == [16, 32]  # dense and int8 tiles
    finally:
        sys.path.remove(str(tmp_path / "pkg"))


@pytest.mark.parametrize("weights", ["int8", "int4", "fp8"])
def test_tuner_problems_store_the_weights_as_their_group(weights):
    """The tuner times a quantised group on weights stored in its format, with row scales, and
    the kernels run them (here under the interpreter)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    tune, configs = kernel_module("tune"), kernel_module("configs")
    GemmConfig, MoeConfig = configs.GemmConfig, configs.MoeConfig
    moe_experts_triton = kernel_module("ops").moe_experts_triton
    x, ids, w, experts = tune.random_problem(
        5, 32, 16, 4, 2, torch.float32, weights=weights, device="cpu"
    )
    stored = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[weights]
    assert experts["w_up_EXH"].dtype == stored and experts["w_down_EHF"].dtype == stored
    cols = 16 if weights == "int4" else 32  # int4: two values per byte
    assert experts["w_up_EXH"].shape == (4, 32, cols)
    assert experts["w_up_scale_EX"].shape == (4, 32) and experts["w_down_scale_EH"].shape == (4, 32)
    config = MoeConfig(GemmConfig(16, 16, 32, 1, 4, 1), GemmConfig(16, 16, 16, 1, 4, 1))
    y = moe_experts_triton(x, ids, w, **experts, config=config)
    assert y.shape == (5, 32) and torch.isfinite(y).all() and y.abs().sum() > 0


def test_plan_shapes_use_a_ranks_slice_under_expert_tp(tmp_path):
    """Under expert tensor parallelism a rank's experts are F / expert_tp wide: the tuner's shape
    must be the one the kernels are called with, or the table is never found."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from moec.codegen import build_files

    spec = SPEC.replace("kernels: {tuning: tiles.json}\n", "") + (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
    )
    (tmp_path / "spec.yaml").write_text(spec)
    _, _, files = build_files(tmp_path / "spec.yaml")
    tune = kernel_module("tune")
    shapes = tune.plan_shapes(json.loads(files["plan.json"]))
    assert [s["shape"] for s in shapes] == [(32, 8, 2, 2, "dense")]  # 4 experts / ep 2, 16 / 2


def test_launch_falls_back_to_fewer_stages_then_shorter_k_tiles():
    """Tiles that need more shared memory than the GPU has (OutOfResources at the first launch)
    are retried with a stage fewer, then half the K tile; what compiled is remembered."""
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    grouped_gemm, GemmConfig = kernel_module("grouped_gemm"), kernel_module("configs").GemmConfig
    from triton.runtime.errors import OutOfResources

    tried = []

    class FakeKernel:  # compiles only with <= 2 stages and BLOCK_K <= max_k
        def __init__(self, max_k):
            self.max_k = max_k

        def fn(self):
            pass

        def __getitem__(self, grid):
            def launch(*args, BLOCK_K, num_stages, **meta):
                tried.append((num_stages, BLOCK_K))
                if num_stages > 2 or BLOCK_K > self.max_k:
                    raise OutOfResources(300_000, 232_448, "shared memory")

            return launch

    kernel, asked = FakeKernel(64), GemmConfig(16, 64, 256, 1, 4, 4)
    grouped_gemm._launch(kernel, (1,), asked, ("test",), 1, 2, H=3)
    assert tried == [(4, 256), (3, 256), (2, 256), (2, 128), (2, 64)]
    tried.clear()
    grouped_gemm._launch(kernel, (1,), asked, ("test",), 1, 2, H=3)
    assert tried == [(2, 64)]  # remembered: no second search
    with pytest.raises(OutOfResources):  # nothing left to shrink
        grouped_gemm._launch(FakeKernel(16), (1,), GemmConfig(16, 64, 32, 1, 4, 2), ("x",), H=3)


def test_default_tiles_follow_the_weight_format_where_measured():
    """fp8 keeps the narrower tiles at a few rows per expert and int4 the earlier ones at ~64 rows
    (both measured faster on an H200); other formats share the bf16 tiles."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    default_config = kernel_module("configs").default_config

    def up_n(T, weights):
        return default_config(T, 4096, 14336, 8, 2, torch.bfloat16, weights).up.block_n

    assert [up_n(16, w) for w in ("dense", "int8", "int4", "fp8")] == [64, 64, 64, 32]
    assert [up_n(256, w) for w in ("dense", "int8", "int4", "fp8")] == [128, 128, 64, 128]


def test_default_tiles_keep_blocks_above_four_thirds_of_the_rows_per_expert():
    """At a mean near the block height about half the experts run a second, nearly empty block
    that streams their weights again; bf16 weights switch to 64-row blocks above 24 rows per
    expert and to 128-row blocks (their tail tile covers experts with <= 64 rows) above 48;
    quantised weights were not measured there and keep 32-row blocks up to 32 rows and 64-row
    ones up to 64."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    default_config = kernel_module("configs").default_config

    def block_m(T, weights="dense"):  # Mixtral's shape: T * 2 / 8 rows per expert
        return default_config(T, 4096, 14336, 8, 2, torch.bfloat16, weights).block_m

    assert [block_m(T) for T in (96, 100, 128, 192, 196, 256, 4096)] == [
        32,
        64,
        64,
        64,
        128,
        128,
        128,
    ]
    assert [block_m(128, w) for w in ("int8", "int4", "fp8")] == [32, 32, 32]
    assert [block_m(256, w) for w in ("int8", "int4", "fp8")] == [64, 64, 64]
    assert block_m(260, "int8") == 128


def test_default_tiles_use_quarter_tail_tiles_for_many_large_experts():
    """With 128-row blocks, many experts with large weights (DeepSeek-V3: 256 of 7168 x 2048) run
    nearly empty last blocks as quarter-height tiles (measured faster on an H200); a few large
    experts (Mixtral) or many small ones (Qwen3, OLMoE) keep half-height ones, as do smaller
    blocks. A config asking for another tail height is refused."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    configs = kernel_module("configs")

    def tail_divs(T, H, F, E, K):
        c = configs.default_config(T, H, F, E, K, torch.bfloat16)
        return c.up.tail_div, c.down.tail_div

    assert tail_divs(4096, 7168, 2048, 256, 8) == (4, 4)  # DeepSeek-V3
    assert tail_divs(16, 7168, 2048, 256, 8) == (2, 2)  # 16-row blocks: no tail tiles
    assert tail_divs(4096, 4096, 14336, 8, 2) == (2, 2)  # Mixtral-8x7B
    assert tail_divs(4096, 2048, 768, 128, 8) == (2, 2)  # Qwen3-30B-A3B
    assert tail_divs(4096, 2048, 1024, 64, 8) == (2, 2)  # OLMoE-1B-7B
    with pytest.raises(ValueError, match="tail_div must be one of"):
        configs.GemmConfig(128, 128, 64, tail_div=8)


def test_default_tiles_fold_tails_for_many_large_dense_experts():
    """Where quarter tails are used, dense experts also fold an expert's last <= 32 slots into the
    program of its full block before it (measured faster on an H200 for DeepSeek-V3 only); not for
    quantised weights (not measured) or other shapes. The tuner tries the fold on and off, and a
    config or table with another fold is refused."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    configs, tune = kernel_module("configs"), kernel_module("tune")

    def fold_ms(T, H, F, E, K, weights="dense"):
        c = configs.default_config(T, H, F, E, K, torch.bfloat16, weights)
        return c.up.fold_m, c.down.fold_m

    assert fold_ms(4096, 7168, 2048, 256, 8) == (32, 32)  # DeepSeek-V3
    assert fold_ms(16384, 7168, 2048, 256, 8) == (32, 32)
    assert fold_ms(4096, 7168, 2048, 256, 8, "int8") == (0, 0)
    assert fold_ms(4096, 4096, 14336, 8, 2) == (0, 0)  # Mixtral-8x7B
    assert fold_ms(4096, 2048, 768, 128, 8) == (0, 0)  # Qwen3-30B-A3B
    assert fold_ms(4096, 2048, 1024, 64, 8) == (0, 0)  # OLMoE-1B-7B
    with pytest.raises(ValueError, match="fold_m must be one of"):
        configs.GemmConfig(128, 128, 64, fold_m=128)

    c = configs.default_config(4096, 7168, 2048, 256, 8, torch.bfloat16).up
    assert any(
        n.fold_m == 0 and n.block_m == c.block_m for n in tune.candidates(c, 7168, 2048, False)
    )
    small = configs.GemmConfig(64, 64, 64, fold_m=32)  # halving block_m drops the fold
    moves = tune.candidates(small, 64, 64, False)[1:]
    assert any(n.block_m == 32 for n in moves)
    assert all(n.fold_m < n.block_m or n.fold_m == 0 for n in moves)


@pytest.mark.parametrize(
    "gpu, table_gpu, shape_ok, want",
    [
        ("h200", "NVIDIA H200", True, []),
        ("h100", "NVIDIA H200", True, ["measured on NVIDIA H200, the cluster has h100"]),
        ("h200", "NVIDIA H200", False, ["no tiles for group 'a' (H, F, E, K, weights) ="]),
    ],
)
def test_plan_notes_a_tuning_table_that_will_not_be_used_as_measured(
    tmp_path, gpu, table_gpu, shape_ok, want
):
    """A table without tiles for a group's kernel shape (it silently ran the heuristic before), or
    measured on another GPU than the cluster's, gets a note in the plan."""
    from moec.plan import run_passes
    from moec.spec import load_spec_text

    table = dict(TABLE, gpu=table_gpu)
    if not shape_ok:
        table = dict(table, tables=[dict(TABLE["tables"][0], ffn=32)])
    (tmp_path / "tiles.json").write_text(json.dumps(table))
    spec, _ = load_spec_text(
        SPEC.replace("experts: [{", "experts: [{name: a, ") + f"cluster: {{gpu: {gpu}}}\n"
    )
    plan = run_passes(spec, tmp_path)
    assert plan.kernels.shapes == (("a", 32, 16, 4, 2, "dense"),)
    notes = [n for n in plan.kernels.notes if "kernels.tuning" in n]
    assert len(notes) == len(want) and all(w in n for w, n in zip(want, notes, strict=True)), notes


def test_confirm_keeps_a_winner_only_when_it_is_faster_on_re_timing():
    """The search's winner is re-timed against the default, alternately; it is kept only when its
    median beats the default's by MIN_GAIN (the fastest of many noisy timings is biased low)."""
    tune = kernel_module("tune")
    calls = []

    def timer(name, times):
        times = iter(times)
        return lambda: calls.append(name) or next(times)

    keep, won, default = tune.confirm(timer("d", [1.0, 1.0, 1.0]), timer("w", [0.9, 0.97, 2.0]))
    assert (keep, won, default) == (True, 0.97, 1.0)
    assert calls == ["d", "w"] * 3  # alternating, so drift hits both
    keep, won, default = tune.confirm(timer("d", [1.0, 1.0, 1.0]), timer("w", [0.99, 0.5, 0.99]))
    assert (keep, won, default) == (False, 0.99, 1.0)  # 1% faster: noise, not kept
    assert tune.confirm(lambda: 1.0, lambda: 0.98)[0]  # exactly MIN_GAIN (2%) is enough
