"""What the expert-path A/B scripts (``kernel_switches.py``, ``tile_regimes.py``,
``routing_spread.py``) share: the kernel library imported from its source, the four benchmark
shapes, and a random problem of one (bf16 weights, bf16 input, top-k of a softmax over random
logits, renormalised). Run those scripts from the repository root on a GPU."""

import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moec/templates/kernels_src"))
# the library, not bench/moe_kernels.py: the scripts take it from here
import moe_kernels as mk  # noqa: E402
from moe_kernels import grouped_gemm  # noqa: E402
from moe_kernels.configs import GemmConfig, MoeConfig  # noqa: E402

__all__ = [
    "SHAPES",
    "GemmConfig",
    "MoeConfig",
    "grouped_gemm",
    "in_turn",
    "medians_in_turn",
    "mk",
    "tokens",
    "weights",
]

SHAPES = {  # (H, F, E, K)
    "mixtral": (4096, 14336, 8, 2),
    "olmoe": (2048, 1024, 64, 8),
    "qwen3": (2048, 768, 128, 8),
    "deepseek_v3": (7168, 2048, 256, 8),
}


def weights(H: int, F: int, E: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_up [E, 2F, H], w_down [E, H, F]) in bf16, std 0.03."""
    w_up = torch.empty(E, 2 * F, H, device="cuda", dtype=torch.bfloat16)
    w_down = torch.empty(E, H, F, device="cuda", dtype=torch.bfloat16)
    return w_up.normal_(0, 0.03, generator=g), w_down.normal_(0, 0.03, generator=g)


def tokens(T: int, H: int, E: int, K: int, g: torch.Generator):
    """(x [T, H] bf16, topk_ids [T, K], topk_weights [T, K]): softmax routing, renormalised."""
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w, ids = torch.softmax(torch.randn(T, E, device="cuda", generator=g), -1).topk(K, -1)
    return x, ids, w / w.sum(-1, keepdim=True)


def in_turn(items: list, r: int) -> list:
    """The order of round r: ``items`` rotated by r, so that over the rounds each goes first as
    often. The GPU heats during a round, and a fixed order biases the A/B: measured always after
    "off", the same kernels came out from 4.5% slower to 6.4% faster than in turn (H200,
    2026-12-02, bench/RESULTS.md)."""
    k = r % len(items)
    return items[k:] + items[:k]


def medians_in_turn(fns: dict, rounds: int, rep: int) -> dict:
    """{name: median ms of ``fns[name]()`` replayed from a CUDA graph}, each timed once a round
    for ``rounds`` rounds, in turn (``in_turn``)."""
    ms = {name: [] for name in fns}
    for r in range(rounds):
        for name in in_turn(list(fns), r):
            ms[name].append(do_bench_cudagraph(fns[name], rep=rep))
    return {name: statistics.median(times) for name, times in ms.items()}
