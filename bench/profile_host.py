"""Host (CPU) profile of one eager ``layer.experts`` call of a generated package, on a GPU.

    python bench/profile_host.py [--shape qwen3_30b_a3b] [--tokens 16] [--calls 200]

Prints cProfile's top entries by own time: where the host time of a small-T call goes (launches,
tensor allocations, Python) when it exceeds the GPU time.
"""

import argparse
import cProfile
import importlib
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "generated"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3_30b_a3b")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    pkg = importlib.import_module(args.shape)
    layer = pkg.MoELayer(torch.bfloat16, device="cuda", backend="triton").eval()
    x = torch.randn(args.tokens, pkg.layer.HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ids, w, _ = layer.route(x)
        for _ in range(10):
            layer.experts(x, ids, w)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            layer.experts(x, ids, w)
        prof.disable()
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).sort_stats("tottime")
    print(f"{args.shape} T={args.tokens}: {args.calls} calls of layer.experts")
    stats.print_stats(30)


if __name__ == "__main__":
    main()
