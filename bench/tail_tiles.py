"""Half-height tail tiles on and off: the expert path's time, and whether the outputs agree.

    python bench/tail_tiles.py [--shapes deepseek_v3,qwen3,olmoe,mixtral] [--tokens 4096,16384]

With 128-row tiles the grouped GEMMs run an expert's last block, when it holds at most 64 slots, as
a 64-row tile (``grouped_gemm.TAIL_MIN_BLOCK_M``). For each shape and token count: median ms of
``moe_experts_triton`` (default tiles, bf16, random weights and softmax routing, replayed from a
CUDA graph) with the tail tiles and without them, and the relative difference of the two outputs.
Run on a GPU from the repository root; the kernels are imported from the library's source.
"""

import argparse
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moec/templates/kernels_src"))
import moe_kernels as mk  # noqa: E402
from moe_kernels import grouped_gemm  # noqa: E402

SHAPES = {  # (H, F, E, K)
    "deepseek_v3": (7168, 2048, 256, 8),
    "qwen3": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "mixtral": (4096, 14336, 8, 2),
}
ON, OFF = grouped_gemm.TAIL_MIN_BLOCK_M, 1 << 30


def compare(x, ids, w, w_up, w_down) -> tuple[float, float, float]:
    """(ms without tail tiles, ms with them, relative difference of the outputs)."""
    ms, y = {}, {}
    for tag, rows in (("off", OFF), ("on", ON)):
        grouped_gemm.TAIL_MIN_BLOCK_M = rows
        y[tag] = mk.moe_experts_triton(x, ids, w, w_up, w_down).float()
        ms[tag] = do_bench_cudagraph(lambda: mk.moe_experts_triton(x, ids, w, w_up, w_down), rep=30)
    grouped_gemm.TAIL_MIN_BLOCK_M = ON
    return ms["off"], ms["on"], ((y["on"] - y["off"]).norm() / y["off"].norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="4096,16384")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print("| shape | T | off ms | on ms | speed-up | rel. difference |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        H, F, E, K = SHAPES[name]
        w_up = torch.empty(E, 2 * F, H, device="cuda", dtype=torch.bfloat16)
        w_down = torch.empty(E, H, F, device="cuda", dtype=torch.bfloat16)
        w_up.normal_(0, 0.03, generator=g), w_down.normal_(0, 0.03, generator=g)
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
            w, ids = torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1).topk(K, -1)
            off, on, rel = compare(x, ids, w / w.sum(-1, keepdim=True), w_up, w_down)
            print(
                f"| {name} | {T} | {off:.3f} | {on:.3f} | {off / on:.3f}x | {rel:.1e} |", flush=True
            )
        del w_up, w_down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
