"""A/B of block heights around ``default_config``'s regime boundaries (rows per expert).

    python bench/tile_regimes.py [--rows 24,32,40,64] [--shapes ...] [--rounds 3]

``default_config`` picks tiles by the mean rows per expert, T*K/E. This script is how its
boundaries were set (H200, 2026-12-02, bench/RESULTS.md): for each shape and each mean row count
(T = rows * E / K tokens), the expert path (``moe_experts_triton``, bf16, random weights, softmax
routing, replayed from a CUDA graph) with the default tiles and with each block height's tiles,
measured alternately for ``--rounds`` rounds, each first in turn (``expert_problem.in_turn``),
medians, and whether every output equals the default's bit for bit. Run on a GPU from the
repository root; the kernels are imported from the library's source.
"""

import argparse

import torch
from expert_problem import SHAPES, GemmConfig, MoeConfig, medians_in_turn, mk, tokens, weights

BLOCKS = {  # the tiles of each block height, as default_config uses them for bf16 weights
    "32-row": MoeConfig(GemmConfig(32, 128, 128, 8, 4, 3), GemmConfig(32, 128, 128, 8, 4, 3)),
    "64-row": MoeConfig(GemmConfig(64, 128, 64, 1, 4, 4), GemmConfig(64, 128, 64, 1, 4, 3)),
    "128-row": MoeConfig(GemmConfig(128, 128, 64, 8, 8, 4), GemmConfig(128, 256, 64, 8, 8, 4)),
}


def measure(T, H, F, E, K, rounds, g) -> dict:
    """{config name: median ms}, and "same": whether all outputs equal the default's."""
    x, ids, w = tokens(T, H, E, K, g)
    w_up, w_down = weights(H, F, E, g)
    configs = {"default": mk.default_config(T, H, F, E, K)} | BLOCKS
    want = mk.moe_experts_triton(x, ids, w, w_up, w_down, config=configs["default"])
    same = all(
        torch.equal(mk.moe_experts_triton(x, ids, w, w_up, w_down, config=c), want)
        for c in configs.values()
    )
    fns = {
        name: (lambda c=c: mk.moe_experts_triton(x, ids, w, w_up, w_down, config=c))
        for name, c in configs.items()
    }
    return medians_in_turn(fns, rounds, 40) | {"same": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="24,32,40,64", help="mean rows per expert, comma-separated")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    names = ["default", *BLOCKS]
    print(f"{torch.cuda.get_device_name()}; median ms of the expert path (speed-up over default)")
    print("| shape | rows per expert | T | default tiles | " + " | ".join(names) + " | same |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for shape in args.shapes.split(","):
        H, F, E, K = SHAPES[shape]
        for rows in map(int, args.rows.split(",")):
            T = rows * E // K
            r = measure(T, H, F, E, K, args.rounds, g)
            c = mk.default_config(T, H, F, E, K)
            tiles = f"{c.up.block_m} rows, group_m {c.up.group_m}"
            cells = [f"{r[n]:.4f} ({r['default'] / r[n]:.3f}x)" for n in names]
            print(
                f"| {shape} | {rows} | {T} | {tiles} | " + " | ".join(cells) + f" | {r['same']} |"
            )
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
