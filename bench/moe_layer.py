"""Benchmark the generated layer's expert path (``layer.experts``) on one GPU, bf16, forward.

What is timed (BENCH.md): given x[T, H] and a routing (softmax of random logits → top-k → renorm),
``layer.experts(x, ids, weights)`` of the package moec generated for each shape, against (a) a
per-expert loop in eager PyTorch and (b) sort + ``torch._grouped_mm``; also ``layer.route(x)`` and
the whole ``layer(x)``. Median of ``triton.testing.do_bench``.

The floor is max(FLOPs / peak, bytes / bandwidth) with FLOPs = 2·T·K·3·H·F and bytes = the weights
of every expert hit at least once + x + y; peak (bf16 GEMM 8192³) and bandwidth (device copy,
bytes read + written) are measured in the same run, at its start (the % of the floor that
BENCH.md and the targets use) and again right after each cell (a second column: the GPU's
ceilings drop as it heats during a run, by ~10-15% on an H200).

The packages come from ``bench/specs`` (the GPU machine has no moec; generate them here first):

    moec build bench/specs/*.yaml --out-dir bench/generated
    python bench/moe_layer.py [--shapes qwen3_30b_a3b,...] [--tokens 16,256] [--tuning T.json ...]

``--tuning`` registers a ``moec tune`` table (as the spec field ``kernels.tuning`` would) and times
the shapes it covers a second time. Writes moe_layer.md and moe_layer.json to $OUT when it is set.
"""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "generated"))

_spec = importlib.util.spec_from_file_location("_kernel_bench", HERE / "moe_kernels.py")
kb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kb)  # eager_loop, grouped_mm, ceilings, median_ms, BEST_PUBLIC

SHAPES = {  # package (bench/specs/<name>.yaml) -> (H, F, E, K); names as in bench/moe_kernels.py
    "mixtral_8x7b": ((4096, 14336, 8, 2), "mixtral"),
    "qwen3_30b_a3b": ((2048, 768, 128, 8), "qwen3_30b_a3b"),
    "olmoe_1b_7b": ((2048, 1024, 64, 8), "olmoe"),
    "deepseek_v3": ((7168, 2048, 256, 8), "deepseek_v3"),
}
TOKENS = (16, 256, 4096, 16384)


def load_layer(name: str):
    pkg = importlib.import_module(name)
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device="cuda", backend="triton").eval()
    return pkg, layer


def routing(T, E, K, g):
    logits = torch.randn(T, E, device="cuda", generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    return ids.int(), w / w.sum(-1, keepdim=True)


def register(pkg, tables, H, F, E, K) -> bool:
    """Register the tuned table of (H, F, E, K) as the generated ``backend.kernels()`` would."""
    for t in tables:
        shape = (t["hidden"], t["ffn"], t["experts"], t["top_k"], t.get("weights", "dense"))
        if shape == (H, F, E, K, "dense"):  # the benchmarked layers hold bf16 weights
            buckets = {int(b): c for b, c in t["buckets"].items()}
            pkg.backend.kernels().register_configs(H, F, E, K, buckets)
            return True
    return False


def bench_shape(name, tokens, peak, bw, tables, g):
    pkg, layer = load_layer(name)
    (group,) = layer.groups.values()
    w_up, w_down = group.w_gate_up_E2FH, group.w_down_EHF
    gmm_weights = [
        (lambda: w_up.transpose(1, 2), lambda: w_down.transpose(1, 2)),
        (kb._cached(lambda: w_up.transpose(1, 2).contiguous()),
         kb._cached(lambda: w_down.transpose(1, 2).contiguous())),
    ]  # fmt: skip
    return [run_case(pkg, layer, w_up, w_down, gmm_weights, T, peak, bw, tables, g) for T in tokens]


@torch.no_grad()
def run_case(pkg, layer, w_up, w_down, gmm_weights, T, peak, bw, tables, g):
    """One token count: the timings of one table row."""
    name = pkg.__name__
    (H, F, E, K), _ = SHAPES[name]
    t0 = time.time()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
    ids, w = routing(T, E, K, g)
    hit = int(torch.unique(ids).numel())
    flops = 2 * T * K * 3 * H * F
    nbytes = hit * 3 * H * F * 2 + 2 * T * H * 2
    floor_ms = max(flops / peak / 1e9, nbytes / bw / 1e9)
    rep = 100 if T <= 4096 else 200
    r = dict(shape=name, H=H, F=F, E=E, K=K, T=T, experts_hit=hit, floor_ms=floor_ms)
    y = layer.experts(x, ids, w)
    r["experts_ms"] = kb.median_ms(lambda: layer.experts(x, ids, w), rep)
    # The ceilings once more, right after the cell: the GPU heats (and slows) during a run, so
    # this floor is the one of the GPU's state when the cell ran; the table shows both.
    r["peak_after"], r["bw_after"] = kb.ceilings()
    r["floor_after_ms"] = max(flops / r["peak_after"] / 1e9, nbytes / r["bw_after"] / 1e9)
    y_loop = kb.eager_loop(x, ids, w, w_up, w_down)
    r["err_vs_loop"] = kb.rel_err(y, y_loop)
    r["loop_ms"] = kb.median_ms(lambda: kb.eager_loop(x, ids, w, w_up, w_down), rep)
    r["grouped_mm_ms"] = None
    for wu, wd in gmm_weights:
        try:
            kb.grouped_mm(x, ids, w, wu(), wd())
            r["grouped_mm_ms"] = kb.median_ms(
                lambda a=wu(), b=wd(): kb.grouped_mm(x, ids, w, a, b), rep
            )
            break
        except Exception as exc:  # torch._grouped_mm missing, or refusing this layout
            r["grouped_mm_error"] = repr(exc)[:300]
    if tables and register(pkg, tables, H, F, E, K):
        r["err_tuned_vs_loop"] = kb.rel_err(layer.experts(x, ids, w), y_loop)
        r["tuned_ms"] = kb.median_ms(lambda: layer.experts(x, ids, w), rep)
        pkg.backend.kernels().register_configs(H, F, E, K, {})  # back to the heuristic
    r["route_ms"] = kb.median_ms(lambda: layer.route(x), 50)
    r["forward_ms"] = kb.median_ms(lambda: layer(x), rep)
    # Where the time goes: the kernels alone, the layer replayed from a CUDA graph (no host
    # overhead), the host time of one eager call, and the routing's parts.
    kernels = pkg.backend.kernels()
    (group,) = layer.groups.values()
    r["kernels_ms"] = kb.median_ms(
        lambda: kernels.moe_experts_triton(x, ids, w, w_up, w_down, **group.KERNEL), rep
    )
    r["experts_graph_ms"] = kb.graph_ms(lambda: layer.experts(x, ids, w))
    r["experts_host_us"] = host_us(lambda: layer.experts(x, ids, w))
    logits = layer.router.logits(x)
    r["logits_ms"] = kb.median_ms(lambda: layer.router.logits(x), 50)
    r["routing_kernel_ms"] = kb.median_ms(lambda: kernels.moe_routing(logits, K, norm="sum"), 50)
    r["route_graph_ms"] = kb.graph_ms(lambda: layer.route(x))
    r["forward_graph_ms"] = kb.graph_ms(lambda: layer(x))
    # The layer's own graphs (layer.use_cuda_graphs(): an eager call that replays a captured
    # graph, with the input copied in and the outputs cloned), against the eager forward's host.
    r["forward_host_us"] = host_us(lambda: layer(x))
    r["forward_graphs_ms"] = r["forward_graphs_host_us"] = None
    if T <= 256:
        layer.use_cuda_graphs()
        layer(x)  # captures
        r["forward_graphs_ms"] = kb.median_ms(lambda: layer(x), rep)
        r["forward_graphs_host_us"] = host_us(lambda: layer(x))
        layer.use_cuda_graphs(max_tokens=0)
    print(
        f"{name:14s} T={T:6d} experts {r['experts_ms']:.3f} ms "
        f"({kb.pct(floor_ms, r['experts_ms'])}; {kb.pct(r['floor_after_ms'], r['experts_ms'])} at "
        f"{r['peak_after']:.0f} TFLOP/s, {r['bw_after']:.2f} TB/s just after) "
        f"tuned {kb.pct(floor_ms, r.get('tuned_ms'))} "
        f"gmm {kb.pct(floor_ms, r['grouped_mm_ms'])} loop {kb.pct(floor_ms, r['loop_ms'])} "
        f"route {1e3 * r['route_ms']:.0f} us forward {r['forward_ms']:.3f} ms "
        f"err {r['err_vs_loop']:.1e} [{time.time() - t0:.1f}s]",
        flush=True,
    )
    return r


def host_us(fn, calls=50):
    """Host (CPU) time of one call, launches included: ``calls`` calls with no sync in between."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def breakdown(rows):
    """Markdown: the layer's overhead over its kernels, and the routing's parts (µs unless ms)."""
    lines = [
        "| shape | T | kernels alone ms | layer.experts ms | layer.experts, CUDA graph ms | "
        "host µs / layer.experts call | router logits µs | routing kernel µs | route µs | "
        "route, CUDA graph µs | layer(x), CUDA graph ms | host µs / layer(x) call | "
        "layer(x) with use_cuda_graphs() ms | its host µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(v):
        return "n/a" if v is None else f"{v:.3f}"

    def us(v):
        return "n/a" if v is None else f"{1e3 * v:.0f}"

    def us_host(v):
        return "n/a" if v is None else f"{v:.0f}"

    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['T']} | {ms(r['kernels_ms'])} | {ms(r['experts_ms'])} | "
            f"{ms(r['experts_graph_ms'])} | {r['experts_host_us']:.0f} | {us(r['logits_ms'])} | "
            f"{us(r['routing_kernel_ms'])} | {us(r['route_ms'])} | {us(r['route_graph_ms'])} | "
            f"{ms(r['forward_graph_ms'])} | {r['forward_host_us']:.0f} | "
            f"{ms(r['forward_graphs_ms'])} | {us_host(r['forward_graphs_host_us'])} |"
        )
    return "\n".join(lines)


def gpu_state() -> str:
    """The GPU's SM and memory clocks, temperature and power now (nvidia-smi), to tell a slower
    run from a slower GPU: the same cell has moved by up to 10% between two leases."""
    query = "clocks.sm,clocks.mem,temperature.gpu,power.draw"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi unavailable"
    sm, mem, temp, power = (v.strip() for v in out.stdout.strip().split(","))
    return f"SM {sm}, memory {mem}, {temp} C, {power}"


def table(rows, peak, bw, device, states=()):
    """Markdown: % of floor (higher is better, 100% = the floor) and the other timings."""
    pct = kb.pct
    lines = [
        f"device: {device}; torch {torch.__version__}, triton {triton.__version__}; ceilings "
        f"measured in this run: bf16 GEMM 8192³ {peak:.0f} TFLOP/s, device copy {bw:.2f} TB/s; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        *(f"GPU {when}: {state}" for when, state in states),
        "",
        "| shape (H, F, E, K) | T | floor ms | layer.experts ms | layer.experts % | "
        "layer.experts %, ceilings just after | tuned table % | torch._grouped_mm % | "
        "per-expert loop % | best public % (BENCH.md) | route µs | layer(x) ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (shape, kname), f = SHAPES[r["shape"]], r["floor_ms"]
        best = kb.BEST_PUBLIC[kname][TOKENS.index(r["T"])] if r["T"] in TOKENS else None
        lines.append(
            f"| {r['shape']} {shape} | {r['T']} | {f:.3f} | {r['experts_ms']:.3f} | "
            f"{pct(f, r['experts_ms'])} | {pct(r.get('floor_after_ms'), r['experts_ms'])} "
            f"({r.get('peak_after', 0):.0f} TFLOP/s, {r.get('bw_after', 0):.2f} TB/s) | "
            f"{pct(f, r.get('tuned_ms'))} | "
            f"{pct(f, r['grouped_mm_ms'])} | {pct(f, r['loop_ms'])} | {best}% | "
            f"{1e3 * r['route_ms']:.0f} | {r['forward_ms']:.3f} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument(
        "--tuning", nargs="*", default=[],
        help="moec tune JSONs: also time the shapes they cover with them",
    )  # fmt: skip
    args = ap.parse_args()
    out = os.environ.get("OUT")
    tables = [t for f in args.tuning for t in json.loads(Path(f).read_text())["tables"]]
    device = torch.cuda.get_device_name()
    states = [("at the start", gpu_state())]
    peak, bw = kb.ceilings()
    print(f"{device}: bf16 GEMM {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s; {states[0][1]}", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for name in args.shapes.split(","):
        rows += bench_shape(name, tokens, peak, bw, tables, g)
        torch.cuda.empty_cache()
        if out:  # keep what is done if a later shape runs out of time
            Path(out, "moe_layer.json").write_text(json.dumps(dict(rows=rows)))
    end_peak, end_bw = kb.ceilings()  # the same GPU at the end: drift shows here
    states.append(
        ("at the end", f"{gpu_state()}; ceilings {end_peak:.0f} TFLOP/s, {end_bw:.2f} TB/s")
    )
    md = table(rows, peak, bw, device, states) + "\n\n" + breakdown(rows)
    print(md)
    if out:
        Path(out, "moe_layer.md").write_text(md + "\n")
        Path(out, "moe_layer.json").write_text(
            json.dumps(
                dict(device=device, peak_tflops=peak, copy_tbps=bw, gpu_states=states, rows=rows),
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
