"""A/B of the kernel library's switches: the expert path's time with a switch on and off.

    python bench/kernel_switches.py [--switch quarter_tails] [--shapes ...]
                                    [--tokens 256,4096,16384] [--rounds 5]

Switches (module constants of ``moe_kernels.grouped_gemm``):
- ``tail_tiles``: with 128-row tiles, an expert's last block holding at most 64 slots runs as a
  64-row tile (``TAIL_MIN_BLOCK_M``).
- ``quarter_tails``: with 128-row tiles, one holding at most 32 slots runs as a 32-row tile
  (``QUARTER_TAIL_MIN_BLOCK_M``; off by default, not yet measured).

A switch measured and settled leaves the kernels (one code path each); ``fused_glu_dot`` (one dot
over interleaved gate and up columns against two dots sharing A) was one, 2026-12-01.

For each shape and token count: median ms of ``moe_experts_triton`` (default tiles, bf16, random
weights and softmax routing, replayed from a CUDA graph), on and off measured alternately for
``--rounds`` rounds (so clock and thermal drift hit both), and the relative difference of the two
outputs. Run on a GPU from the repository root; the kernels are imported from the library's source.
"""

import argparse
import statistics

import torch
from expert_problem import SHAPES, grouped_gemm, mk, tokens, weights
from triton.testing import do_bench_cudagraph

SWITCHES = {  # name -> (module constant, value when on, value when off)
    "tail_tiles": ("TAIL_MIN_BLOCK_M", grouped_gemm.TAIL_MIN_BLOCK_M, 1 << 30),
    "quarter_tails": ("QUARTER_TAIL_MIN_BLOCK_M", grouped_gemm.TAIL_MIN_BLOCK_M, 1 << 30),
}


def compare(switch, rounds, x, ids, w, w_up, w_down) -> tuple[float, float, float]:
    """(median ms off, median ms on, relative difference of the outputs)."""
    name, on_value, off_value = SWITCHES[switch]
    default = getattr(grouped_gemm, name)
    ms, y = {"off": [], "on": []}, {}
    try:
        for _ in range(rounds):
            for tag, value in (("off", off_value), ("on", on_value)):
                setattr(grouped_gemm, name, value)
                y[tag] = mk.moe_experts_triton(x, ids, w, w_up, w_down).float()
                fn = lambda: mk.moe_experts_triton(x, ids, w, w_up, w_down)  # noqa: E731
                ms[tag].append(do_bench_cudagraph(fn, rep=20))
    finally:
        setattr(grouped_gemm, name, default)
    rel = ((y["on"] - y["off"]).norm() / y["off"].norm()).item()
    return statistics.median(ms["off"]), statistics.median(ms["on"]), rel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch", choices=sorted(SWITCHES), default="quarter_tails")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"switch {args.switch}, {args.rounds} alternating rounds, {torch.cuda.get_device_name()}")
    print("| shape | T | off ms | on ms | speed-up | rel. difference |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        H, F, E, K = SHAPES[name]
        w_up, w_down = weights(H, F, E, g)
        for T in map(int, args.tokens.split(",")):
            x, ids, w = tokens(T, H, E, K, g)
            off, on, rel = compare(args.switch, args.rounds, x, ids, w, w_up, w_down)
            print(
                f"| {name} | {T} | {off:.3f} | {on:.3f} | {off / on:.3f}x | {rel:.1e} |", flush=True
            )
        del w_up, w_down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
