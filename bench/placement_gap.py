"""How far the placement heuristics are from optimal, and how fast planning is at scale.

Run: ``.venv/bin/python bench/placement_gap.py`` (CPU only, about a minute).

Table 1: Zipf-skewed routing traces (top-8 of E experts, 8192 tokens, 3 layers each), G ranks in
nodes of 8. Each cell is max / mean rank load averaged over the layers (1.00 = perfect). The
replicating strategies (replicate, eplb, eplb-h, opt+R) get R = G extra slots (one more per rank). "gap" is
``max load / best known bound - 1`` worst over layers: against the proven ILP optimum where the
instance is small enough (marked ``*``), otherwise against the simple lower bound
``max(mean, hottest expert / copies)``. eplb is DeepSeek EPLB's global policy, eplb-h its
hierarchical policy with DeepSeek-V3's 8 expert groups (one or more whole groups per node).
Table 2: affinity's inter-node co-selection fraction against balanced, on clustered traces.
Table 3: predicted dispatch times (µs) of one MoE layer on H100 nodes (DeepSeek-V3 shapes,
replicate placement with one extra slot per rank, Zipf 0.5 routing).
Table 4: wall time of the DeepSeek-V3 plan (61 layers x 256 experts) on 256 nodes x 8 GPUs.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from moec.plan.cost import PROFILES, ExpertShape, choose_dispatch, dispatch_traffic
from moec.plan.placement import place
from moec.plan.placement_problem import Placement, make_problem
from moec.plan.topology import make_mesh
from moec.plan.trace import LayerTrace, Trace, zipf_trace

GPN = 8
ILP_MAX_VARS = 512  # E x G binaries the exact solver gets (5 s per layer at most)
# a benchmark may stop the solver by the clock: no node limit here (builds use one, not a clock)
ILP = dict(time_limit_s=5.0, node_limit=10**9)


def mean_imbalance(plan: Placement) -> float:
    return float(np.mean([layer.imbalance for layer in plan.layers]))


def gap_row(exponent: float, experts: int, ranks: int) -> str:
    trace = zipf_trace(experts, exponent, num_layers=3, tokens=8192, top_k=8, seed=7)
    node_G = tuple(g // GPN for g in range(ranks))
    shape = ExpertShape(2048, 768)
    plain = make_problem(trace, shape, node_G, top_k=8)
    extra = make_problem(trace, shape, node_G, redundant=ranks, top_k=8)
    plans = {
        "uniform": place(plain, "uniform"),
        "balanced": place(plain, "balanced"),
        "replicate": place(extra, "replicate"),
        "eplb": place(extra, "eplb"),
        "eplb-h": place(extra, "eplb", groups=8),
    }
    exact = experts * ranks <= ILP_MAX_VARS
    if exact:
        plans["opt"] = place(plain, "optimal", **ILP)
        plans["opt+R"] = place(extra, "optimal", **ILP)
    cells = [f"{mean_imbalance(plans[k]):5.2f}" if k in plans else "    -" for k in COLUMNS]
    gaps = []
    for name, ref in (
        ("balanced", "opt"),
        ("replicate", "opt+R"),
        ("eplb", "opt+R"),
        ("eplb-h", "opt+R"),
    ):
        if ref in plans:
            pairs = zip(plans[name].layers, plans[ref].layers, strict=True)
            gap = max(max(a.load_G) / max(b.load_G) - 1 for a, b in pairs)
            proven = "*" if plans[ref].proven_optimal else "~"
        else:
            gap, proven = plans[name].gap, " "
        gaps.append(f"{100 * gap:6.1f}%{proven}")
    return f"| {exponent:3.1f} | {experts:3d} | {ranks:2d} | " + " | ".join(cells + gaps) + " |"


COLUMNS = ("uniform", "balanced", "replicate", "eplb", "eplb-h", "opt", "opt+R")


def table_gap() -> None:
    head = " | ".join(f"{c:>9}" for c in COLUMNS)
    print(f"| s   |   E |  G | {head} | gap bal | gap rep | gap eplb | gap eplb-h |")
    print("|" + "---|" * (3 + len(COLUMNS) + 4))
    for experts in (64, 256):
        for ranks in (8, 16, 64):
            for exponent in (0.5, 1.0, 1.5):
                print(gap_row(exponent, experts, ranks), flush=True)


def table_affinity() -> None:
    print("| E | G | nodes | balanced inter-node | affinity inter-node | affinity max/mean |")
    print("|---|---|---|---|---|---|")
    for experts, ranks in ((64, 16), (64, 32), (256, 64)):
        nodes = ranks // GPN
        trace = zipf_trace(
            experts, 0.5, tokens=8192, top_k=8, seed=3, with_pairs=True, clusters=nodes
        )
        perm = np.random.default_rng(0).permutation(experts)  # hide the clusters from the ids
        layer = trace.layers[0]
        pairs = tuple(
            (int(min(perm[i], perm[j])), int(max(perm[i], perm[j])), n) for i, j, n in layer.pairs
        )
        counts = tuple(np.asarray(layer.counts_E)[np.argsort(perm)].tolist())
        problem = make_problem(
            Trace((LayerTrace(counts, pairs),)),
            ExpertShape(2048, 768),
            tuple(g // GPN for g in range(ranks)),
            top_k=8,
        )
        bal, aff = place(problem, "balanced").layers[0], place(problem, "affinity").layers[0]
        print(
            f"| {experts} | {ranks} | {nodes} | {bal.inter_node_fraction:.3f} | "
            f"{aff.inter_node_fraction:.3f} | {aff.imbalance:.2f} |"
        )


def table_dispatch() -> None:
    gpu = PROFILES["h100"]
    print("| nodes | flat µs | hierarchical µs | all-gather µs | choice |")
    print("|---|---|---|---|---|")
    for nodes in (1, 2, 4, 8, 16):
        ranks = nodes * GPN
        trace = zipf_trace(256, 0.5, tokens=4096, top_k=8, seed=1)
        node_G = np.repeat(np.arange(nodes), GPN)
        problem = make_problem(
            trace, ExpertShape(7168, 2048), tuple(node_G.tolist()), redundant=ranks, top_k=8
        )
        layer = place(problem, "replicate").layers[0]
        probs_E = np.asarray(trace.layers[0].counts_E) / sum(trace.layers[0].counts_E)
        tokens_G = np.full(ranks, 4096)
        send, unique = dispatch_traffic(layer.share_EG(256), probs_E, tokens_G, 8, 7168 * 2, node_G)
        choice = choose_dispatch(send, node_G, gpu.intra, gpu.inter, tokens_G * 7168 * 2.0, unique)
        print(
            f"| {nodes} | {choice.flat_us:.0f} | {choice.hierarchical_us:.0f} | "
            f"{choice.all_gather_us:.0f} | {choice.choice} |"
        )


def deepseek_trace() -> Trace:
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 257) ** 0.8
    layers = []
    for _ in range(61):
        counts = rng.multinomial(8 * 8192, rng.permutation(weights / weights.sum()))
        layers.append(LayerTrace(tuple(counts.astype(float).tolist())))
    return Trace(tuple(layers))


def table_scale() -> None:
    trace = deepseek_trace()
    shape = ExpertShape(7168, 2048, dtype="fp8")
    print("| ep | redundant | strategy | ranks planned | seconds (best of 3) | max/mean |")
    print("|---|---|---|---|---|---|")
    for ep, redundant in ((2048, 32), (2048, 1792), (64, 32)):
        mesh = make_mesh(256, 8, dp=2048, ep=ep)
        for strategy in ("replicate", "eplb"):  # eplb: global policy
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                problem = make_problem(trace, shape, mesh.ep_nodes(), redundant=redundant, top_k=8)
                plan = place(problem, strategy)
                best = min(best, time.perf_counter() - start)
            print(
                f"| {ep} | {redundant} | {strategy} | {mesh.ep} | {best:.3f} | "
                f"{mean_imbalance(plan):.2f} |",
                flush=True,
            )


def main() -> int:
    print("## Placement imbalance (max/mean rank load) on Zipf-skewed traces\n")
    table_gap()
    print("\n## Affinity on clustered traces (share of co-selection split across nodes)\n")
    table_affinity()
    print("\n## Predicted dispatch, DeepSeek-V3 layer (H=7168, K=8, 4096 tokens/rank), H100\n")
    table_dispatch()
    print("\n## DeepSeek-V3 plan on 256 nodes x 8 GPUs (61 layers x 256 experts)\n")
    table_scale()
    return 0


if __name__ == "__main__":
    sys.exit(main())
