"""Host time of a generated layer's launch code, with the Triton kernels stubbed out (any CPU).

    moec build bench/specs/qwen3_30b_a3b.yaml --out-dir bench/generated
    python bench/host_overhead.py [--shape qwen3_30b_a3b] [--tokens 16] [--calls 2000] [--profile]
                                  [--generated DIR]

Imports the package under ``TRITON_INTERPRET=1`` (so CPU tensors take the Triton path), replaces
every kernel launch with a no-op, and times ``layer.experts(x, ids, weights)`` in float32 on the
CPU: what is left is the Python, argument checking and tensor allocation that every eager call
pays on top of Triton's own launcher. (``layer.route`` is not timed: its router GEMM would run
on the CPU for real.) At decode sizes that host
time, not the GPU, bounds an eager call (bench/RESULTS.md), so it is worth tracking on its own.
"""

import argparse
import cProfile
import importlib
import os
import pkgutil
import pstats
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    @staticmethod
    def fn():  # the launch code names kernels by their function
        pass

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels(pkg) -> None:
    """Replace the kernels of every module of the package's kernel library by no-ops (the launch
    code around them still runs)."""
    kernels = importlib.import_module(f"{pkg.__name__}.kernels")
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for attr in dir(module):
            if attr.startswith("_") and attr.endswith("_kernel"):
                setattr(module, attr, _NoLaunch())


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """The best of ``rounds`` rounds of ``calls`` calls, µs per call (the least disturbed round)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3_30b_a3b")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="print cProfile's top entries too")
    ap.add_argument("--generated", default=str(Path(__file__).resolve().parent / "generated"))
    args = ap.parse_args()
    sys.path.insert(0, args.generated)
    pkg = importlib.import_module(args.shape)
    stub_kernels(pkg)
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.float32, backend="triton").eval()
    x = torch.randn(args.tokens, pkg.layer.HIDDEN)
    logits = torch.randn(args.tokens, pkg.layer.NUM_EXPERTS)
    weights, ids = torch.softmax(logits, -1).topk(pkg.router.TOP_K, -1)
    ids = ids.int()
    with torch.no_grad():
        experts_us = per_call_us(lambda: layer.experts(x, ids, weights), args.calls)
        print(
            f"{args.shape} T={args.tokens}: layer.experts {experts_us:.1f} µs of host time per call"
            " (best of 5 rounds), kernels stubbed"
        )
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls // 4):
                layer.experts(x, ids, weights)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
