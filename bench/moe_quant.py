"""Benchmark weight-only quantised experts (int8, int4, fp8 e4m3) against bf16 on one GPU.

What is timed: the expert path ``moe_experts_triton(x, ids, weights, w_up, w_down)`` (align → up
GEMM + GLU → down GEMM → combine) of one layer shape with bf16 activations, once with bf16 weights
and once per stored format with a float32 scale per weight row, replayed from a CUDA graph (median
of ``do_bench_cudagraph``). The routing is a softmax of random logits → top-k → renormalised.
Each quantised run is checked against the bf16 kernels on the dequantised weights (relative error
of the output; the two differ only in summation order and the rounding of scaled products).

The quantised formats are what a generated layer stores for an expert group with ``dtype: int8 |
int4 | fp8``: int8 and fp8 [E, rows, cols]; int4 packed two values per byte along the input
dimension (uint8 [E, rows, cols // 2], low nibble first, value = nibble - 8).

    python bench/moe_quant.py [--shapes qwen3_30b_a3b,mixtral] [--tokens 16,256,4096]

Writes moe_quant.md and moe_quant.json to $OUT when it is set.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moec/templates/kernels_src"))

from moe_kernels.ops import moe_experts_triton  # noqa: E402
from moe_kernels.reference import dequantize  # noqa: E402

SHAPES = {  # H, F, E, K
    "mixtral": (4096, 14336, 8, 2),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "deepseek_v3": (7168, 2048, 256, 8),
}
FORMATS = ("bf16", "int8", "int4", "fp8")


def quantized(shape, fmt, g):
    """(stored weight, float32 row scale or None, the bf16 weight it stands for)."""
    *lead, rows, cols = shape
    randn = lambda: torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa
    if fmt == "bf16":
        w = randn() / cols**0.5
        return w, None, w
    scale = torch.rand(*lead, rows, device="cuda", generator=g) / cols**0.5 / 20 + 1e-4
    if fmt == "int8":
        q = torch.randint(-127, 128, shape, device="cuda", generator=g, dtype=torch.int8)
    elif fmt == "int4":
        packed = (*lead, rows, cols // 2)
        q = torch.randint(0, 256, packed, device="cuda", generator=g, dtype=torch.uint8)
    else:  # fp8 e4m3: finite values only (|v| <= 448)
        q = (randn() * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    dense = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    for e in range(shape[0]):  # one expert at a time: no float32 copy of the whole weight
        if fmt == "fp8":
            dense[e] = (q[e].float() * scale[e, :, None]).bfloat16()
        else:
            dense[e] = dequantize(q[e], scale[e], torch.bfloat16)
    return q, scale, dense


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_format(x, ids, w, up, down):
    """(median ms, rel. error vs the bf16 kernels on the dequantised weights) of one format."""
    (qu, su, du), (qd, sd, dd) = up, down
    kw = {} if su is None else dict(w_up_scale_EX=su, w_down_scale_EH=sd)
    err = rel_err(
        moe_experts_triton(x, ids, w, qu, qd, **kw), moe_experts_triton(x, ids, w, du, dd)
    )
    ms = do_bench_cudagraph(
        lambda: moe_experts_triton(x, ids, w, qu, qd, **kw), rep=50, return_mode="median"
    )
    return ms, err


@torch.no_grad()
def bench_shape(name, tokens, g):
    H, F, E, K = SHAPES[name]
    rows = {T: dict(shape=name, T=T) for T in tokens}
    inputs = {}
    for T in tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        w, ids = torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1).topk(K, -1)
        inputs[T] = (x, ids, w / w.sum(-1, keepdim=True))
    for fmt in FORMATS:  # one format's weights in memory at a time (DeepSeek-V3: 22 GB in bf16)
        up, down = quantized((E, 2 * F, H), fmt, g), quantized((E, H, F), fmt, g)
        for T, (x, ids, w) in inputs.items():
            rows[T][f"{fmt}_ms"], rows[T][f"{fmt}_err"] = time_format(x, ids, w, up, down)
        del up, down
        torch.cuda.empty_cache()
    for r in rows.values():
        print(json.dumps(r), flush=True)
    return list(rows.values())


def table(rows, device):
    out = [
        f"Expert path, bf16 activations, {device}; ms (speed-up over bf16 weights) [rel. err]",
        "",
        "| shape | T | " + " | ".join(FORMATS) + " |",
        "|---" * (2 + len(FORMATS)) + "|",
    ]
    for r in rows:
        cells = [f"{r['bf16_ms']:.3f}"]
        for f in FORMATS[1:]:
            cells.append(
                f"{r[f + '_ms']:.3f} ({r['bf16_ms'] / r[f + '_ms']:.2f}×) [{r[f + '_err']:.1e}]"
            )
        out.append(f"| {r['shape']} | {r['T']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="16,256,4096")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, [int(t) for t in args.tokens.split(",")], g)
        torch.cuda.empty_cache()
    md = table(rows, torch.cuda.get_device_name())
    print(md)
    if out := os.environ.get("OUT"):
        Path(out, "moe_quant.md").write_text(md)
        Path(out, "moe_quant.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
