"""Under torchrun: the generated dispatcher's all-to-all against a raw all_to_all_single of the same rows.

    torchrun --nproc-per-node 2 bench/multi_gpu/a2a_vs_raw.py bench/multi_gpu/generated/mixtral_ep2 [--out DIR]

For each token count: draw a Mixtral-like routing (softmax of random logits, top-2, renormalised), time
(a) dist.all_to_all_single of the [U, H] bf16 rows (one per token and destination rank) with the
dispatcher's own split sizes, (b) the dispatcher's dispatch (counts exchange + rows and their slots),
(c) its combine; print medians and (a)/(b).
"""

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def median_ms(fn, repeat=20):
    times = []
    for _ in range(repeat + 3):
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[3:])
    return times[len(times) // 2] * 1e3


def measure(d, tokens: int, hidden: int, experts: int, top_k: int, rank: int) -> dict:
    """Raw all_to_all_single vs the dispatcher's dispatch and combine for one token count."""
    torch.manual_seed(rank)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    w, ids = torch.randn(tokens, experts, device="cuda").softmax(-1).topk(top_k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    x_N, _, _, state = d.dispatch(x, ids, w)
    send, recv = state["hops"][0][0], state["hops"][0][1]
    src = x[state["hops"][0].parent_U]  # one row per (token, destination rank)
    out = x.new_empty((sum(recv), hidden))
    raw = median_ms(lambda: dist.all_to_all_single(out, src, recv, send))
    ours = median_ms(lambda: d.dispatch(x, ids, w))
    back = median_ms(lambda: d.combine(x_N, state, tokens))
    sent = sum(n for g, n in enumerate(send) if g != rank) * hidden * 2
    row = {
        "tokens": tokens,
        "bytes_sent_to_peer": sent,
        "raw_ms": raw,
        "dispatch_ms": ours,
        "combine_ms": back,
        "raw_over_dispatch": raw / ours,
        "raw_over_combine": raw / back,
    }
    if rank == 0:
        print(json.dumps(row), flush=True)
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("package")
    parser.add_argument("--out")
    args = parser.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    folder = Path(args.package).resolve()
    sys.path.insert(0, str(folder.parent))
    comm = importlib.import_module(f"{folder.name}.comm")
    hidden = comm._PLAN["dims"]["hidden"]
    experts, top_k = comm.NUM_EXPERTS, comm._PLAN["dims"]["top_k"]
    d = comm.Dispatcher(0)
    rows = [measure(d, tokens, hidden, experts, top_k, rank) for tokens in (512, 4096, 16384)]
    if rank == 0 and args.out:
        Path(args.out, "a2a_vs_raw.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
