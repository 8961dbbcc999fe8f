"""What the spread of rows per expert costs the expert path: random routing against balanced.

    python bench/routing_spread.py [--cases deepseek_v3:4096,qwen3:4096,...] [--rounds 3]

For each shape and token count, ``moe_experts_triton`` (default tiles, bf16, random weights,
replayed from a CUDA graph) with the routing every other benchmark here uses (top-k of a softmax
over random logits: rows per expert spread around T*K/E) and with balanced routing (token t's
slots go to experts (t*K + k) mod E, so every expert gets exactly T*K/E rows), measured
alternately for ``--rounds`` rounds, each first in turn; medians. With 128-row blocks an expert
a few rows past a multiple of the block runs one more program per output tile, which streams its
weights again: the balanced time is what the kernels would take without that (H200, 2026-12-02:
1.03-1.22x, bench/RESULTS.md). Run on a GPU from the repository root.
"""

import argparse

import torch
from expert_problem import SHAPES, medians_in_turn, mk, tokens, weights

CASES = "mixtral:4096,qwen3:4096,olmoe:4096,deepseek_v3:4096,deepseek_v3:16384"


def measure(rounds: int, routings: tuple, x, w, w_up, w_down) -> list[float]:
    """Median ms of the expert path for each routing (ids), measured in turn."""
    fns = {
        i: (lambda ids=ids: mk.moe_experts_triton(x, ids, w, w_up, w_down))
        for i, ids in enumerate(routings)
    }
    ms = medians_in_turn(fns, rounds, 30)
    return [ms[i] for i in range(len(routings))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=CASES, help="shape:tokens, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; median ms of the expert path")
    print("| shape | T | rows per expert (min-max) | random ms | balanced ms | balanced speed-up |")
    print("|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        name, T = case.split(":")
        T, (H, F, E, K) = int(T), SHAPES[name]
        w_up, w_down = weights(H, F, E, g)
        x, ids, w = tokens(T, H, E, K, g)
        balanced = (
            torch.arange(T, device="cuda")[:, None] * K + torch.arange(K, device="cuda")
        ) % E
        r, b = measure(args.rounds, (ids, balanced), x, w, w_up, w_down)
        rows = torch.bincount(ids.flatten(), minlength=E)
        print(
            f"| {name} | {T} | {T * K / E:g} ({int(rows.min())}-{int(rows.max())}) | {r:.3f} | "
            f"{b:.3f} | {r / b:.2f}x |",
            flush=True,
        )
        del w_up, w_down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
