"""A/B of the kernel library's switches: the expert path's time with a switch on and off.

    python bench/kernel_switches.py [--switch quarter_tails] [--shapes ...]
                                    [--tokens 256,4096,16384] [--rounds 5]

Switches:
- ``tail_tiles`` (module constant ``grouped_gemm.TAIL_MIN_BLOCK_M``): with 128-row tiles, an
  expert's last block holding at most 64 slots runs as a 64-row tile.
- ``quarter_tails`` (config field ``tail_div`` 4 against 2, on the default tiles of each shape and
  token count): with 128-row tiles, one holding at most 32 slots runs as a 32-row tile.
  ``default_config`` turns it on for many large experts (measured 2026-12-02).
- ``fold`` (config field ``fold_m`` 32 against 0, on the default tiles): an expert's last block of
  at most 32 slots computed by the program of the full block before it. ``default_config`` turns
  it on for many large experts with dense weights (measured 2026-12-02).

A switch measured and settled leaves the kernels (one code path each); ``fused_glu_dot`` (one dot
over interleaved gate and up columns against two dots sharing A) was one, 2026-12-01, and
programmatic dependent launch of the path's kernels (0.97-1.01x, not adopted) another, 2026-12-02.

For each shape and token count: median ms of ``moe_experts_triton`` (bf16, random weights and
softmax routing, replayed from a CUDA graph), on and off measured alternately for ``--rounds``
rounds, each first in every other round (``expert_problem.in_turn``: a fixed order biased an A/B
by up to 6%), and the relative difference of the two outputs. Run on a GPU from the repository
root; the kernels are imported from the library's source.
"""

import argparse
import contextlib
import functools
from dataclasses import replace

import torch
from expert_problem import SHAPES, MoeConfig, grouped_gemm, medians_in_turn, mk, tokens, weights
from moe_kernels.configs import default_config


@contextlib.contextmanager
def tail_tiles(on: bool, T, H, F, E, K):
    """Half-height tail tiles on or off (a module constant); the default tiles."""
    default = grouped_gemm.TAIL_MIN_BLOCK_M
    grouped_gemm.TAIL_MIN_BLOCK_M = default if on else 1 << 30
    try:
        yield None
    finally:
        grouped_gemm.TAIL_MIN_BLOCK_M = default


@contextlib.contextmanager
def quarter_tails(on: bool, T, H, F, E, K):
    """The default tiles with ``tail_div`` 4 (on) or 2 (off)."""
    c = default_config(T, H, F, E, K, torch.bfloat16)
    tail_div = 4 if on else 2
    yield MoeConfig(replace(c.up, tail_div=tail_div), replace(c.down, tail_div=tail_div))


@contextlib.contextmanager
def fold(on: bool, T, H, F, E, K):
    """The default tiles with ``fold_m`` 32 (on) or 0 (off)."""
    c = default_config(T, H, F, E, K, torch.bfloat16)
    fold_m = 32 if on else 0
    yield MoeConfig(replace(c.up, fold_m=fold_m), replace(c.down, fold_m=fold_m))


SWITCHES = {
    "tail_tiles": tail_tiles,
    "quarter_tails": quarter_tails,
    "fold": fold,
}


def compare(switch, rounds, shape, x, ids, w, w_up, w_down) -> tuple[float, float, float]:
    """(median ms off, median ms on, relative difference of the outputs)."""

    def run(tag):
        with SWITCHES[switch](tag == "on", x.shape[0], *shape) as config:
            return mk.moe_experts_triton(x, ids, w, w_up, w_down, config=config)

    y = {tag: run(tag).float() for tag in ("off", "on")}
    ms = medians_in_turn({tag: functools.partial(run, tag) for tag in ("off", "on")}, rounds, 20)
    rel = ((y["on"] - y["off"]).norm() / y["off"].norm()).item()
    return ms["off"], ms["on"], rel


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
            off, on, rel = compare(args.switch, args.rounds, (H, F, E, K), x, ids, w, w_up, w_down)
            print(
                f"| {name} | {T} | {off:.3f} | {on:.3f} | {off / on:.3f}x | {rel:.1e} |", flush=True
            )
        del w_up, w_down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
