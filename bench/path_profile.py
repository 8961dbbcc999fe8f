"""What each kernel of the expert path takes: GPU time per kernel of ``moe_experts_triton``.

    python bench/path_profile.py [--shapes mixtral,qwen3,...] [--tokens 256,4096,16384]

For each shape and token count (default tiles, bf16, random weights and softmax routing, as in
``kernel_switches.py``): the path's median time replayed from a CUDA graph, then ten eager calls
under ``torch.profiler`` and each kernel's mean GPU time per call (the alignment's ``_count`` and
``_scatter``, the ``_up`` and ``_down`` GEMMs, the ``_combine``, and any torch kernel). Run on a
GPU from the repository root; the kernels are imported from the library's source.
"""

import argparse
import functools

import torch
from expert_problem import SHAPES, mk, tokens, weights
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench_cudagraph

CALLS = 10


def kernel_times(fn) -> list[tuple[float, str]]:
    """[(mean µs per call, kernel name)], slowest first, over CALLS eager calls of ``fn``."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    rows = [
        (ev.self_device_time_total / CALLS, ev.key[:60])
        for ev in prof.key_averages()
        if ev.self_device_time_total > 0
    ]
    return sorted(rows, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="256,4096,16384")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name())
    for name in args.shapes.split(","):
        H, F, E, K = SHAPES[name]
        w_up, w_down = weights(H, F, E, g)
        for T in map(int, args.tokens.split(",")):
            x, ids, w = tokens(T, H, E, K, g)
            fn = functools.partial(mk.moe_experts_triton, x, ids, w, w_up, w_down)
            graph_us = do_bench_cudagraph(fn, rep=50) * 1e3
            rows = kernel_times(fn)
            total = sum(us for us, _ in rows)
            print(f"== {name} T={T}: CUDA graph {graph_us:.1f} us, kernels sum {total:.1f} us")
            for us, kernel in rows[:8]:
                print(f"   {us:9.1f} us  {kernel}", flush=True)
        del w_up, w_down
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
