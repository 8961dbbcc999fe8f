"""Measure the fastest tile configs of the expert GEMMs on this GPU, per token count.

``tune`` times candidate ``MoeConfig``s of one shape end to end (align → up GEMM + GLU → down GEMM
→ combine, ``moe_experts_triton``) on a random routing (softmax of random logits → top-k → renorm),
checks each candidate's output against the default config's, and keeps the fastest. The search is
three coordinate passes around ``default_config``: both GEMMs' block_m halved or doubled together,
then the up GEMM's tiles, then the down GEMM's with the winning up config (at most 2 + 2 × 22
candidates per token count). The winner is then re-timed against the default, alternately, and
kept only when it is at least ``MIN_GAIN`` faster (``confirm``). Groups with weight-only int8 /
int4 / fp8 weights are tuned with weights stored that way: converting the tiles in registers moves
the best tiles.

As a command, inside a generated package (``python -m <pkg>.kernels.tune --out tuning.json``), it
reads the package's plan and writes the table format that ``moec build`` reads from the spec field
``kernels: {tuning: tuning.json}``.

Shape legend: T tokens, H hidden, F expert width, E experts, K top-k.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from .configs import GemmConfig, MoeConfig, _fit, default_config
from .grouped_gemm import TAIL_MIN_BLOCK_M
from .ops import moe_experts_triton

MAX_PER_GEMM = 22  # candidates per GEMM and token count (3 passes: <= 2 + 44 timed configs)
MAX_REL_ERR = 1e-2  # a candidate's output vs the default's (bf16 sums in another order: ~1e-3)
# The fastest of ~40 noisy timings is biased low (the winner's curse): an OLMoE table whose search
# found its tiles 1.02-1.06x faster was no faster in the layer (H200, bench/RESULTS.md, 2026-12-01).
CONFIRM_ROUNDS = 3  # alternate timings of the default and the winner after the search
MIN_GAIN = 0.02  # the winner's median must beat the default's by this fraction to be kept
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def candidates(c: GemmConfig, reduce_dim: int, out_dim: int, fp32: bool) -> list[GemmConfig]:
    """``c`` and its neighbours: one field changed at a time, then a few pairs, shrunk to fit."""
    moves = [
        dict(block_m=c.block_m // 2),
        dict(block_m=c.block_m * 2),
        dict(block_n=c.block_n // 2),
        dict(block_n=c.block_n * 2),
        dict(block_k=c.block_k // 2),
        dict(block_k=c.block_k * 2),
        dict(num_warps=4 if c.num_warps == 8 else 8),
        dict(num_stages=c.num_stages - 1),
        dict(num_stages=c.num_stages + 1),
        dict(group_m=1 if c.group_m > 1 else 8),
        dict(group_m=16),
        dict(tail_div=4 if c.tail_div == 2 else 2),
        dict(fold_m=32 if c.fold_m == 0 else 0),
        dict(block_n=c.block_n * 2, block_k=c.block_k // 2),
        dict(block_n=c.block_n // 2, block_k=c.block_k * 2),
        dict(block_m=c.block_m * 2, num_warps=8),
        dict(block_m=c.block_m // 2, block_n=c.block_n * 2),
        dict(block_n=c.block_n * 2, num_warps=8),
        dict(num_warps=4 if c.num_warps == 8 else 8, num_stages=c.num_stages + 1),
        dict(block_k=c.block_k * 2, num_stages=c.num_stages - 1),
        dict(block_m=c.block_m * 2, block_n=c.block_n // 2),
        dict(block_m=c.block_m // 2, block_k=c.block_k * 2),
    ]
    out = [c]
    for move in moves:
        n = _fit(replace(c, **move), reduce_dim, out_dim)
        # Tensor-core tiles want >= 16 rows; 4-byte tiles with long K overflow shared memory.
        if n.block_m < 16 or n.block_m > 256 or n.num_stages < 2 or n.num_stages > 6:
            continue
        if n.tail_div != c.tail_div and n.block_m < TAIL_MIN_BLOCK_M:  # no tail tiles there
            continue
        if n.fold_m >= n.block_m:  # no fold there
            n = replace(n, fold_m=0)
        if fp32 and n.block_k > 32:
            continue
        if n not in out:
            out.append(n)
    return out[:MAX_PER_GEMM]


def joint_candidates(c: MoeConfig) -> list[MoeConfig]:
    """Both GEMMs' block_m halved or doubled together. The slots are padded to the larger block_m,
    so moving one GEMM's alone never changes the padding; at ~BLOCK_M rows per expert a smaller
    block on both sides wastes far fewer rows (DeepSeek-V3 at T=4096, ~128 rows per expert: 32% of
    the rows are padding at 128, 19% at 64)."""
    out = []
    for block_m in (c.block_m // 2, c.block_m * 2):
        if 16 <= block_m <= 256:
            out.append(MoeConfig(replace(c.up, block_m=block_m), replace(c.down, block_m=block_m)))
    return out


def random_problem(T, H, F, E, K, dtype, glu=True, seed=0, weights="dense", device="cuda"):
    """x [T, H], routing (ids [T, K] int32, weights [T, K] f32), and the expert weights as
    ``{"w_up_EXH", "w_down_EHF"[, "w_up_scale_EX", "w_down_scale_EH"]}`` (keyword arguments of
    ``moe_experts_triton``) stored as ``weights`` ("dense": in ``dtype``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    logits = torch.randn(T, E, device=device, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    X = 2 * F if glu else F
    up, up_scale = random_weight((E, X, H), dtype, weights, g)
    down, down_scale = random_weight((E, H, F), dtype, weights, g)
    experts = dict(w_up_EXH=up, w_down_EHF=down)
    if weights != "dense":
        experts.update(w_up_scale_EX=up_scale, w_down_scale_EH=down_scale)
    return x, ids.int(), w, experts


def random_weight(shape, dtype, weights, g):
    """(stored weight, float32 scale per row or None) with entries of size ~ 1/sqrt(columns)."""
    *lead, rows, cols = shape
    device = g.device
    if weights == "dense":
        w = torch.randn(shape, device=device, dtype=dtype, generator=g).mul_(cols**-0.5)
        return w, None
    scale = torch.full((*lead, rows), cols**-0.5 / 64, device=device)
    if weights == "int8":
        q = torch.randint(-127, 128, shape, device=device, dtype=torch.int8, generator=g)
    elif weights == "int4":  # two values per byte along the columns
        q = torch.randint(0, 256, (*lead, rows, cols // 2), device=device, generator=g)
        q = q.to(torch.uint8)
        scale *= 16
    else:  # fp8 e4m3, finite (|v| <= 448)
        q = (torch.randn(shape, device=device, generator=g) * 64).clamp(-448, 448)
        q = q.to(torch.float8_e4m3fn)
    return q, scale


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def tune(
    H: int,
    F: int,
    E: int,
    K: int,
    dtype: torch.dtype = torch.bfloat16,
    token_counts=(16, 256, 4096, 16384),
    candidates_fn=None,
    rep_ms: int = 25,
    activation: str = "silu",
    glu_form: str = "standard",
    log=print,
    weights: str = "dense",
) -> dict:
    """The fastest ``MoeConfig`` per token count: ``{T: {"up": {...}, "down": {...}}}``.

    Args:
        H, F, E, K: the expert group's shape (hidden, expert width, experts, top-k slots).
        dtype: activation dtype (and the weights' when ``weights`` is "dense").
        weights: "dense", or the weight-only quantised format "int8", "int4" or "fp8" (their tiles
            are converted in registers, which moves the best tiles).
        token_counts: the buckets to measure (tokens of one call).
        candidates_fn: ``(GemmConfig, reduce_dim, out_dim, fp32) -> [GemmConfig]``; default
            ``candidates``.
        rep_ms: ``do_bench`` time budget per candidate.
    Each entry also holds ``"ms"`` and ``"default_ms"`` (median times) for the report; ``to_json``
    drops them.
    """
    candidates_fn = candidates_fn or candidates
    glu = glu_form != "none"
    fp32 = dtype == torch.float32
    out = {}
    for T in token_counts:
        x, ids, w, experts = random_problem(T, H, F, E, K, dtype, glu, seed=T, weights=weights)

        def run(cfg, x=x, ids=ids, w=w, experts=experts):
            return moe_experts_triton(
                x, ids, w, **experts, activation=activation, glu_form=glu_form, config=cfg
            )

        base = default_config(T, H, F, E, K, dtype, weights)
        y_ref = run(base)
        base_ms = _time(lambda b=base: run(b), rep_ms)
        best, best_ms, tried = base, base_ms, 0
        for side in ("both", "up", "down"):
            if side == "both":
                moves = joint_candidates(best)
            else:
                dims = (H, F) if side == "up" else (F, H)
                moves = [
                    replace(best, **{side: c})
                    for c in candidates_fn(getattr(best, side), *dims, fp32)
                ]
            for cfg in moves:
                if cfg == best:
                    continue
                tried += 1
                ms = _measure(run, cfg, y_ref, rep_ms)
                if ms is not None and ms < best_ms:
                    best, best_ms = cfg, ms
                _progress(f"  T={T}: {tried} candidates timed ({side} pass), best {best_ms:.3f} ms")
        _progress("")
        note = ""
        if best != base:
            keep, won_ms, base_ms = confirm(
                lambda b=base: _time(lambda: run(b), rep_ms),
                lambda b=best: _time(lambda: run(b), rep_ms),
            )
            if not keep:
                note = f" (the search's {best_ms:.3f} ms was not confirmed: {won_ms:.3f} ms)"
            best, best_ms = (best, won_ms) if keep else (base, base_ms)
        out[T] = {"up": asdict(best.up), "down": asdict(best.down), "ms": best_ms}
        out[T]["default_ms"] = base_ms
        log(
            f"  H={H} F={F} E={E} K={K} {weights} T={T}: {tried} candidates, default "
            f"{base_ms:.3f} ms -> "
            f"best {best_ms:.3f} ms ({base_ms / best_ms:.2f}x) up {_short(best.up)} "
            f"down {_short(best.down)}{note}"
        )
        del x, ids, w, experts, y_ref
        torch.cuda.empty_cache()
    return out


def confirm(time_default, time_winner, rounds=CONFIRM_ROUNDS, min_gain=MIN_GAIN):
    """(keep the winner?, its median ms, the default's median ms): both re-timed ``rounds`` times,
    alternately (so drift on the GPU hits both), the winner kept when its median is at least
    ``min_gain`` below the default's."""
    default_ms, winner_ms = [], []
    for _ in range(rounds):
        default_ms.append(time_default())
        winner_ms.append(time_winner())
    d, w = statistics.median(default_ms), statistics.median(winner_ms)
    return w <= (1.0 - min_gain) * d, w, d


def _progress(text: str) -> None:
    """One status line, rewritten in place, on a terminal (nothing when stderr is a file)."""
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def _short(c: GemmConfig) -> str:
    fold = f"/f{c.fold_m}" if c.fold_m else ""
    return f"{c.block_m}x{c.block_n}x{c.block_k}/g{c.group_m}/w{c.num_warps}/s{c.num_stages}{fold}"


def _measure(run, cfg: MoeConfig, y_ref: torch.Tensor, rep_ms: int) -> float | None:
    """Median ms of ``run(cfg)``, or None when it fails to compile / launch or disagrees."""
    try:
        y = run(cfg)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - out of shared memory, too many registers, ...
        return None
    if not torch.isfinite(y).all() or _rel_err(y, y_ref) > MAX_REL_ERR:
        return None
    return _time(lambda: run(cfg), rep_ms)


def _time(fn, rep_ms: int) -> float:
    """Median ms of ``fn`` on the GPU: replayed from a CUDA graph, so that the host's launch
    overhead (which tiles do not change, and which CUDA graphs remove in serving) does not hide
    the kernels' own time at small T; plain ``do_bench`` where capture fails."""
    try:
        return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    except Exception:  # noqa: BLE001 - capture refused by this torch / driver
        return do_bench(fn, rep=rep_ms, return_mode="median")


# --------------------------------------------------------------------------------------------------
# The plan's kernel shapes, and the JSON moec reads
# --------------------------------------------------------------------------------------------------
def plan_shapes(plan: dict) -> list[dict]:
    """One entry per distinct (H, F, E, K, weights) the plan's expert kernels are called with
    (``plan["kernels"]["shapes"]``: E the experts a rank holds, F a rank's expert-tp slice).

    weights is "dense" for a bf16 / fp16 / fp32 group (tuned in that dtype) or the group's
    weight-only format (int8 / int4 / fp8), tuned with bf16 activations.
    """
    groups = {g["name"]: g for g in plan["groups"]}
    seen, out = set(), []
    for name, *shape in plan["kernels"]["shapes"]:
        g, key = groups[name], tuple(shape)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            dict(
                shape=key,
                dtype=DTYPES.get(g["dtype"], torch.bfloat16),
                activation=g["activation"],
                glu_form=g["glu"] if g["kind"] == "glu" else "none",
            )
        )
    return out


def to_json(results: list[tuple[tuple, dict]], dtype: torch.dtype, gpu: str) -> dict:
    """The file ``moec.plan.tuning.load_tuning`` reads; ``results`` is
    [((H, F, E, K, weights), tune())]."""
    tables = [
        {
            "hidden": H,
            "ffn": F,
            "experts": E,
            "top_k": K,
            "weights": weights,
            "buckets": {str(T): {"up": c["up"], "down": c["down"]} for T, c in table.items()},
            "measured_ms": {str(T): [c["default_ms"], c["ms"]] for T, c in table.items()},
        }
        for (H, F, E, K, weights), table in results
    ]
    return {
        "gpu": gpu,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "measured_ms: [default_config, tuned] median ms of the expert path per bucket",
        "tables": tables,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m <package>.kernels.tune",
        description="Tune the expert GEMM tiles of this package's plan on this GPU.",
    )
    ap.add_argument("--out", required=True, help="tuning JSON to write")
    ap.add_argument("--tokens", default="16,256,4096,16384", help="token counts (buckets)")
    ap.add_argument("--rep-ms", type=int, default=25, help="do_bench budget per candidate")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: tuning needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    from .. import PLAN

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    shapes = plan_shapes(PLAN)
    if not shapes:
        print("error: no expert group of this plan runs the Triton kernels", file=sys.stderr)
        return 2
    results = []
    for s in shapes:
        print(
            f"tuning {PLAN['name']} (H, F, E, K, weights) = {s['shape']} on {tokens}",
            file=sys.stderr,
        )
        log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        H, F, E, K, weights = s["shape"]
        table = tune(
            H, F, E, K, s["dtype"], tokens, None, args.rep_ms, s["activation"], s["glu_form"], log,
            weights,
        )  # fmt: skip
        results.append((s["shape"], table))
    data = to_json(results, shapes[0]["dtype"], torch.cuda.get_device_name())
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out}: {len(results)} shape(s) x {len(tokens)} buckets", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
