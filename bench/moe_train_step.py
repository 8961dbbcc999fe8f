"""Time a training step of the generated layer on one GPU: forward, and forward + backward.

    python bench/moe_train_step.py [--shapes qwen3_30b_a3b,...] [--tokens 4096] [--recompute-gu]

For each package in bench/generated (build them first: ``moec build bench/specs/*.yaml --out-dir
bench/generated``), bf16, ``backend="triton"`` and ``backend="torch"``: median ms of ``layer(x)``
under no_grad, and of ``layer(x).backward(g)`` with x and the weights requiring gradients; the same
step captured once in a CUDA graph and replayed (gradients returned, not accumulated; Triton path
only: the torch path's backward waits for the GPU); and the memory the forward leaves for the
backward.
The Triton path's backward is ``kernels/backward.py``: four grouped GEMMs, from the pre-activations
the forward kept; ``--recompute-gu`` builds the layer with ``keep_preactivations=False``, so the
backward recomputes the up GEMM (five grouped GEMMs: the cost of not keeping them).
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent / "generated"))


def forward_ms(layer, x):
    with torch.no_grad():
        return do_bench(lambda: layer(x), warmup=5, rep=100, return_mode="median")


def step_ms(layer, x, g):
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(g)

    return do_bench(step, warmup=5, rep=200, return_mode="median")


def graph_step_ms(layer, x, g):
    """The step captured in a CUDA graph, replayed. The gradients are returned
    (``torch.autograd.grad``), not accumulated into ``.grad``: as in ``step_ms``, whose
    ``zero_grad(set_to_none=True)`` makes each backward write fresh gradients. (Accumulating adds a
    read-modify-write of every weight gradient: 2.8 GB for Mixtral-8x7B's experts, ~2 ms on an
    H200, which is what made this column slower than eager for Mixtral before.)"""
    params = [p for p in layer.parameters() if p.requires_grad]

    def step():
        return torch.autograd.grad(layer(x), [x, *params], g)

    side = torch.cuda.Stream()  # warm up outside the capture, as torch.cuda.graph wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = do_bench(graph.replay, warmup=5, rep=200, return_mode="median")
    del graph
    return ms


def saved_mb(layer, x):
    """MB the forward leaves allocated for the backward (activations autograd keeps): memory after
    ``layer(x)`` with autograd recording, less memory before it."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = layer(x)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    del y
    return kept / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="mixtral_8x7b,qwen3_30b_a3b,olmoe_1b_7b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--recompute-gu", action="store_true", help="do not keep the pre-activations")
    args = ap.parse_args()
    print(
        "| shape | T | backend | forward ms | forward + backward ms | forward + backward, "
        "CUDA graph ms | kept for the backward MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes.split(","):
        pkg = importlib.import_module(name)
        torch.manual_seed(0)
        layer = pkg.MoELayer(
            torch.bfloat16, device="cuda", keep_preactivations=not args.recompute_gu
        )
        x = torch.randn(args.tokens, pkg.layer.HIDDEN, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(x)
        x.requires_grad_()
        for backend in ("triton", "torch"):
            layer.backend = backend
            fwd = forward_ms(layer, x)
            both = step_ms(layer, x, g)
            kept = saved_mb(layer, x)
            graph = f"{graph_step_ms(layer, x, g):.3f}" if backend == "triton" else "n/a"
            print(
                f"| {name} | {args.tokens} | {backend} | {fwd:.3f} | {both:.3f} | {graph} "
                f"| {kept:.0f} |",
                flush=True,
            )
        del layer, x, g
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
