"""The expert path's kernels under Nsight Compute: hardware counters for chosen cells.

    ncu --clock-control none --profile-from-start off --set full -o OUT/path \\
        python3 bench/ncu_path.py --cells olmoe:256,qwen3:4096
    (or: bash bench/run_all.sh ncu)

For each ``shape:T`` cell (default tiles, bf16, random weights and softmax routing, as in
``kernel_switches.py``): compile and warm up the path unprofiled, then one ``moe_experts_triton``
call between ``cudaProfilerStart`` and ``cudaProfilerStop``, so that ncu records that call's
kernels only. With ``--dense``, also one cuBLAS GEMM of the cell's up-GEMM FLOPs ([T·K, H] × one
expert's [H, 2F]), to compare the counters of a GEMM that streams no per-expert weights. Run on a
GPU from the repository root; the kernels are imported from the library's source.
"""

import argparse

import torch
from expert_problem import SHAPES, mk, tokens, weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", default="olmoe:256,qwen3:4096,deepseek_v3:16384")
    ap.add_argument("--dense", action="store_true")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    cudart = torch.cuda.cudart()
    for cell in args.cells.split(","):
        name, T = cell.split(":")
        H, F, E, K = SHAPES[name]
        w_up, w_down = weights(H, F, E, g)
        x, ids, w = tokens(int(T), H, E, K, g)
        dense = []  # the cuBLAS GEMM's operands, with --dense only ([T·K, H] is 1.9 GB at most)
        if args.dense:
            dense = [torch.randn(int(T) * K, H, device="cuda", dtype=torch.bfloat16), w_up[0].t()]
        for _ in range(3):
            mk.moe_experts_triton(x, ids, w, w_up, w_down)
        if dense:
            torch.mm(*dense)
        torch.cuda.synchronize()
        print(f"== {cell}: profiled call", flush=True)
        cudart.cudaProfilerStart()
        mk.moe_experts_triton(x, ids, w, w_up, w_down)
        if dense:
            torch.mm(*dense)
        torch.cuda.synchronize()
        cudart.cudaProfilerStop()
        del w_up, w_down, dense
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
