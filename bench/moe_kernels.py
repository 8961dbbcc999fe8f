"""Benchmark the Triton MoE expert path against eager PyTorch and torch._grouped_mm (one GPU, bf16).

What is timed (BENCH.md): given x[T, H] and a routing (softmax of random logits → top-k → renorm),
y = Σ_k w_k · W2_e (silu(W_gate_e x) * (W_up_e x)). The router GEMM is not in the time; our routing
kernel is timed on its own. Median of ``triton.testing.do_bench``.

The floor is max(FLOPs / peak, bytes / bandwidth) with FLOPs = 2·T·K·3·H·F and bytes = the weights of
every expert hit at least once + x + y; peak (bf16 GEMM 8192³) and bandwidth (device-to-device copy,
bytes read + written) are measured in the same run.

Usage: python bench/moe_kernels.py [--shapes mixtral,qwen3...] [--tokens 16,256] [--sweep SECONDS]
Writes moe_kernels.md and moe_kernels.json to $OUT when it is set.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "moec/templates/kernels_src"))

import moe_kernels as mk  # noqa: E402
from moe_kernels import grouped_gemm, permute  # noqa: E402
from moe_kernels.combine import combine  # noqa: E402
from moe_kernels.configs import GemmConfig, MoeConfig  # noqa: E402

SHAPES = {  # H, F, E, K
    "mixtral": (4096, 14336, 8, 2),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "olmoe": (2048, 1024, 64, 8),
    "deepseek_v3": (7168, 2048, 256, 8),
}
TOKENS = (16, 256, 4096, 16384)
BEST_PUBLIC = {  # BENCH.md, % of floor, H100
    "mixtral": (97, 89, 71, 78),
    "qwen3_30b_a3b": (88, 87, 44, 53),
    "olmoe": (85, 63, 41, 48),
    "deepseek_v3": (98, 95, 67, 52),
}


def median_ms(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / median_ms(lambda: a @ b) / 1e9
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    tbps = 2 * src.numel() * 4 / median_ms(lambda: dst.copy_(src)) / 1e9
    return tflops, tbps


def make_routing(T, E, K, g):
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    return logits, ids.int(), w / w.sum(-1, keepdim=True)


def eager_loop(x, ids, w, w_up, w_down):
    """Hugging Face eager style: one masked gather / two matmuls / index_add per expert hit."""
    E = w_up.shape[0]
    F = w_down.shape[2]
    y = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(ids.long(), E).permute(2, 1, 0)  # [E, K, T]
    for e in torch.nonzero(mask.sum((-1, -2)) > 0).flatten().tolist():
        k, tok = torch.where(mask[e])
        gu = x[tok] @ w_up[e].T
        h = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
        y.index_add_(0, tok, (h @ w_down[e].T) * w[tok, k, None].to(x.dtype))
    return y


def grouped_mm(x, ids, w, w_up, w_down):
    """Sort slots by expert, then torch._grouped_mm for both GEMMs.

    ``w_up`` / ``w_down`` are passed as [E, in, out] (transposed views, or copies when the
    views are refused).
    """
    T, K = ids.shape
    E, F, _ = w_down.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat)
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    tok = order // K
    gu = torch._grouped_mm(x[tok], w_up, offs=offs)
    h = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
    o = torch._grouped_mm(h, w_down, offs=offs)
    o = o * w.reshape(-1)[order, None].to(o.dtype)
    return torch.zeros_like(x).index_add_(0, tok, o)


def _cached(make):
    box = []

    def get():
        if not box:
            box.append(make())
        return box[0]

    return get


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_ms(fn):
    """Median time of ``fn`` replayed from a CUDA graph (no launch overhead), or None."""
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception as exc:  # capture refused
        print(f"  cuda graph failed: {exc!r}"[:200], flush=True)
        return None


def run_case(name, x, logits, ids, w, w_up, w_down, gmm_weights, peak, bw, tuned):
    H, F, E, K = SHAPES[name]
    T = x.shape[0]
    hit = int(torch.unique(ids).numel())
    flops = 2 * T * K * 3 * H * F
    nbytes = hit * 3 * H * F * 2 + 2 * T * H * 2
    floor_ms = max(flops / peak / 1e9, nbytes / bw / 1e9)
    rep = 100 if T <= 4096 else 200
    row = dict(shape=name, T=T, experts_hit=hit, floor_ms=floor_ms)

    def ours(cfg=None):
        return mk.moe_experts_triton(x, ids, w, w_up, w_down, config=cfg)

    y = ours()
    row["ours_ms"] = median_ms(ours, rep)
    y_loop = eager_loop(x, ids, w, w_up, w_down)
    row["err_vs_loop"] = rel_err(y, y_loop)
    best_cfg = None
    if tuned is not None:
        row["tuned_config"] = repr(tuned)
        row["err_tuned_vs_loop"] = rel_err(ours(tuned), y_loop)
        row["tuned_ms"] = median_ms(lambda: ours(tuned), rep)
        best_cfg = tuned if row["tuned_ms"] < row["ours_ms"] else None
    row["best_graph_ms"] = graph_ms(lambda: ours(best_cfg))
    row["loop_ms"] = median_ms(lambda: eager_loop(x, ids, w, w_up, w_down), rep)
    row["grouped_mm_ms"] = None
    for wu, wd in gmm_weights:
        try:
            row["err_gmm_vs_loop"] = rel_err(grouped_mm(x, ids, w, wu(), wd()), y_loop)
            row["grouped_mm_ms"] = median_ms(
                lambda a=wu(), b=wd(): grouped_mm(x, ids, w, a, b), rep
            )
            break
        except Exception as exc:  # torch._grouped_mm missing, or refusing this layout
            row["grouped_mm_error"] = repr(exc)[:300]
    cfg = mk.default_config(T, H, F, E, K, torch.bfloat16)
    row["default_config"] = repr(cfg)
    al = permute.align_by_expert(ids, E, cfg.block_m)
    row["align_graph_ms"] = graph_ms(lambda: permute.align_by_expert(ids, E, cfg.block_m))
    o = torch.randn(T * K, H, device="cuda", dtype=x.dtype)
    row["combine_graph_ms"] = graph_ms(lambda: combine(o, ids, E))
    row["routing_ms"] = median_ms(lambda: mk.moe_routing(logits, K, norm="sum"))
    row["routing_graph_ms"] = graph_ms(lambda: mk.moe_routing(logits, K, norm="sum"))
    row["routing_torch_ms"] = median_ms(lambda: torch.softmax(logits, -1).topk(K, dim=-1), 50)
    del al
    return row


def pct(floor_ms, ms):
    return f"{100 * floor_ms / ms:.0f}%" if ms else "n/a"


def fmt_ms(ms):
    return f"{ms:.3f}" if ms else "n/a"


def table(rows, peak, bw, device):
    """Markdown: % of floor for each implementation (higher is better, 100% = the floor)."""
    lines = [
        f"device: {device}; torch {torch.__version__}, triton {triton.__version__}; "
        f"ceilings measured in this run: bf16 GEMM 8192³ {peak:.0f} TFLOP/s, "
        f"device copy {bw:.2f} TB/s; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| shape (H, F, E, K) | T | floor ms | ours ms (default cfg) | ours % | tuned % | "
        "ours best cfg, CUDA graph % | torch._grouped_mm % | per-expert loop % | "
        "best public % (BENCH.md) | align / combine / routing µs (graph) | torch routing µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best = BEST_PUBLIC[r["shape"]][TOKENS.index(r["T"])] if r["T"] in TOKENS else None
        f = r["floor_ms"]
        us = [
            f"{1000 * r[k]:.0f}" if r.get(k) else "n/a"
            for k in ("align_graph_ms", "combine_graph_ms", "routing_graph_ms")
        ]
        lines.append(
            f"| {r['shape']} {SHAPES[r['shape']]} | {r['T']} | {f:.3f} | {r['ours_ms']:.3f} | "
            f"{pct(f, r['ours_ms'])} | {pct(f, r.get('tuned_ms'))} | {pct(f, r['best_graph_ms'])} | "
            f"{pct(f, r['grouped_mm_ms'])} | {pct(f, r['loop_ms'])} | {best}% | {' / '.join(us)} | "
            f"{1000 * r['routing_torch_ms']:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Tile sweep: time each GEMM alone over a few candidates of its regime; the winners form a tuned
# config (each GEMM its own block_m; the slots are aligned to the larger one).
# --------------------------------------------------------------------------------------------------
CANDIDATES = {  # regime -> gemm -> [(block_m, block_n, block_k, group_m, num_warps, num_stages)]
    "small": {  # <= 8 rows per expert: streaming weights
        "up": [(16, 32, 256, 1, 4, 4), (16, 64, 256, 1, 4, 3), (16, 32, 128, 1, 4, 5),
               (16, 64, 128, 1, 4, 4), (16, 128, 128, 1, 4, 3), (16, 32, 512, 1, 4, 3)],
        "down": [(16, 64, 256, 1, 4, 3), (16, 32, 256, 1, 4, 4), (16, 64, 128, 1, 4, 4),
                 (16, 128, 128, 1, 4, 3), (16, 128, 256, 1, 8, 3), (16, 32, 512, 1, 4, 3)],
    },
    "medium": {  # <= 64 rows per expert
        "up": [(32, 128, 128, 8, 4, 3), (32, 64, 128, 8, 4, 4), (64, 64, 128, 8, 4, 4),
               (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4), (64, 64, 256, 8, 4, 3)],
        "down": [(16, 64, 128, 1, 4, 4), (32, 64, 128, 8, 4, 4), (64, 128, 64, 8, 4, 4),
                 (64, 64, 128, 8, 4, 4), (128, 128, 64, 8, 8, 3), (32, 128, 128, 8, 4, 3)],
    },
    "large": {
        "up": [(128, 128, 64, 8, 8, 3), (64, 256, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4),
               (64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 4), (128, 128, 32, 8, 8, 4)],
        "down": [(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 64, 8, 4, 4),
                 (64, 256, 64, 8, 8, 3), (128, 256, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4)],
    },
}  # fmt: skip


def regime(T, E, K):
    rows = T * K / E
    return "small" if rows <= 8 else "medium" if rows <= 64 else "large"


def sweep(name, T, x, ids, w, w_up, w_down):
    """Time each candidate of each GEMM; returns (all timings, tuned MoeConfig)."""
    H, F, E, K = SHAPES[name]
    rw = w.reshape(-1).float().contiguous()
    aligned, timings, best = {}, [], {}
    for which in ("up", "down"):
        for cand in CANDIDATES[regime(T, E, K)][which]:
            c = GemmConfig(*cand)
            if c.block_m not in aligned:
                al = permute.align_by_expert(ids, E, c.block_m)
                h = grouped_gemm.up_proj(
                    x,
                    w_up,
                    None,
                    None,
                    al.sorted_slot_ids_P,
                    al.expert_of_block_B,
                    al.expert_offsets_E1,
                    K,
                    GemmConfig(c.block_m, 64, 64, 8, 4, 3),
                )
                aligned[c.block_m] = (*al[:3], h)
            srt, eob, off, h = aligned[c.block_m]
            if which == "up":
                call = (grouped_gemm.up_proj, x, w_up, None, None, srt, eob, off, K, c)
            else:
                call = (grouped_gemm.down_proj, h, w_down, None, rw, srt, eob, off, T * K, c)
            try:
                ms = median_ms(lambda a=call: a[0](*a[1:]), rep=40)
            except Exception as exc:  # out of shared memory etc.
                ms = float("inf")
                print(f"  {name} T={T} {which} {cand}: {type(exc).__name__}", flush=True)
            timings.append(dict(shape=name, T=T, gemm=which, config=cand, ms=ms))
            if ms < best.get(which, (float("inf"),))[0]:
                best[which] = (ms, c)
    return timings, MoeConfig(best["up"][1], best["down"][1])


def bench_shape(name, tokens, args, peak, bw, g):
    H, F, E, K = SHAPES[name]
    w_up = torch.randn(E, 2 * F, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w_down = torch.randn(E, H, F, device="cuda", dtype=torch.bfloat16, generator=g)
    w_up.mul_(H**-0.5)
    w_down.mul_(F**-0.5)
    gmm_weights = [
        (lambda: w_up.transpose(1, 2), lambda: w_down.transpose(1, 2)),
        (_cached(lambda: w_up.transpose(1, 2).contiguous()),
         _cached(lambda: w_down.transpose(1, 2).contiguous())),
    ]  # fmt: skip
    rows, sweeps = [], []
    for T in tokens:
        t0 = time.time()
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
        logits, ids, w = make_routing(T, E, K, g)
        tuned = None
        if args.sweep:
            timings, tuned = sweep(name, T, x, ids, w, w_up, w_down)
            sweeps += timings
        r = run_case(name, x, logits, ids, w, w_up, w_down, gmm_weights, peak, bw, tuned)
        rows.append(r)
        print(
            f"{name:14s} T={T:6d} ours {r['ours_ms']:.3f} ms ({pct(r['floor_ms'], r['ours_ms'])})"
            f" tuned {pct(r['floor_ms'], r.get('tuned_ms'))} graph {pct(r['floor_ms'], r['best_graph_ms'])}"
            f" gmm {pct(r['floor_ms'], r['grouped_mm_ms'])} loop {pct(r['floor_ms'], r['loop_ms'])}"
            f" err {r['err_vs_loop']:.1e} [{time.time() - t0:.1f}s] {r.get('tuned_config', '')}",
            flush=True,
        )
    return rows, sweeps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep", action="store_true", help="tune tiles per case and time the winners")
    args = ap.parse_args()
    out = os.environ.get("OUT")
    device = torch.cuda.get_device_name()
    peak, bw = ceilings()
    print(f"{device}: bf16 GEMM {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, sweeps = [], []
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in args.shapes.split(","):
        torch.cuda.empty_cache()
        r, s = bench_shape(name, tokens, args, peak, bw, g)
        rows += r
        sweeps += s
        if out:  # keep what is done if a later shape runs out of time
            Path(out, "moe_kernels.json").write_text(json.dumps(dict(rows=rows, sweep=sweeps)))
    md = table(rows, peak, bw, device) if rows else ""
    print(md)
    if sweeps:
        print("\ntuned configs (shape, T: MoeConfig):")
        for r in rows:
            if "tuned_config" in r:
                print(f"  {r['shape']}, {r['T']}: {r['tuned_config']}")
    if out:
        Path(out, "moe_kernels.md").write_text(md + "\n")
        Path(out, "moe_kernels.json").write_text(
            json.dumps(dict(device=device, peak_tflops=peak, copy_tbps=bw, rows=rows,
                            sweep=sweeps), indent=1)  # fmt: skip
        )


if __name__ == "__main__":
    main()
