"""The reference placement strategies, against which the heuristics are measured
(``bench/placement_gap.py``): ``optimal`` (exact min-max ILP with HiGHS, small instances; its
optimum or dual bound bounds the heuristics) and ``eplb`` (DeepSeek's hierarchical balancer,
re-implemented as a baseline).

Legend as in :mod:`moec.plan.placement_problem`.
"""

from __future__ import annotations

import numpy as np

from moec.plan.packing import balanced_packing, lpt_pack, replica_counts, replicate_slots
from moec.plan.placement_problem import (
    LayerPlacement,
    Placement,
    PlacementError,
    PlacementProblem,
    check_memory,
    finish_layer,
    lower_bound,
    per_layer,
)

# Branch-and-bound nodes per layer, and the largest instance (E x G binaries). On this project's
# CPU machine (scipy 1.17, 2026-12-02) 500 nodes took 0.8-17 s a layer for 32-256 experts on 8-32
# ranks; the time limit of 10 s a layer used before stopped those searches at a machine-dependent
# point, with no better loads than the node limit's.
NODE_LIMIT = 500
MAX_VARS = 4096


def _milp_layer(problem: PlacementProblem, layer: int, node_limit: int, time_limit_s: float | None):
    """Solve one layer's min-max-load ILP with HiGHS. Returns ``(slots | None, dual, proven)``.

    Variables: x[e, g] (copy of e on g, binary), y[e, g] (its token share, only with replicas),
    z (max load). min z s.t. rank loads <= z, shares of an expert sum to 1, y <= x, total copies
    = E + R, per-rank bytes <= cap, rank loads in descending order (ranks are interchangeable).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array, eye, hstack

    num_e, num_g, rep = problem.experts, problem.ranks, problem.redundant > 0
    load_E, bytes_E = problem.load_E(layer), np.asarray(problem.bytes_E)
    n_x = num_e * num_g
    e_of, g_of = np.divmod(np.arange(n_x), num_g)  # variable k = e * G + g
    y_col = (n_x if rep else 0) + np.arange(n_x)  # the columns that carry load
    n_var = (2 * n_x if rep else n_x) + 1

    def rows(row_k, col_k, val_k, n_rows):
        return coo_array((val_k, (row_k, col_k)), shape=(n_rows, n_var))

    z_rows = rows(np.arange(num_g), np.full(num_g, n_var - 1), -np.ones(num_g), num_g)
    cons = [
        LinearConstraint(rows(g_of, y_col, load_E[e_of], num_g) + z_rows, -np.inf, 0.0),
        LinearConstraint(rows(e_of, y_col, np.ones(n_x), num_e), 1.0, 1.0),
    ]
    if num_g > 1:  # load[g] - load[g + 1] >= 0
        up, down = g_of < num_g - 1, g_of > 0
        order = rows(
            np.r_[g_of[up], g_of[down] - 1],
            np.r_[y_col[up], y_col[down]],
            np.r_[load_E[e_of[up]], -load_E[e_of[down]]],
            num_g - 1,
        )
        cons.append(LinearConstraint(order, 0.0, np.inf))
    if rep:
        link = hstack([-eye(n_x), eye(n_x), coo_array((n_x, 1))])
        cons.append(LinearConstraint(link, -np.inf, 0.0))  # y <= x
        total = min(num_e + problem.redundant, n_x)  # at most one copy per (expert, rank)
        cons.append(
            LinearConstraint(rows(np.zeros(n_x), np.arange(n_x), np.ones(n_x), 1), total, total)
        )
    if problem.mem_cap_bytes is not None:
        mem = rows(g_of, np.arange(n_x), bytes_E[e_of], num_g)
        cons.append(LinearConstraint(mem, -np.inf, problem.mem_cap_bytes))
    integrality = np.r_[np.ones(n_x), np.zeros(n_var - n_x)]
    res = milp(
        np.r_[np.zeros(n_var - 1), 1.0],
        integrality=integrality,
        bounds=Bounds(0, np.r_[np.ones(n_var - 1), np.inf]),
        constraints=cons,
        options={"node_limit": node_limit, "mip_rel_gap": 1e-6}
        | ({} if time_limit_s is None else {"time_limit": time_limit_s}),
    )
    dual = float(getattr(res, "mip_dual_bound", None) or 0.0)
    if res.x is None:
        return None, dual, False
    x = np.round(res.x[:n_x]).astype(bool)
    y = res.x[y_col][x].clip(0.0)
    share = y / np.bincount(e_of[x], weights=y, minlength=num_e)[e_of[x]]
    return (g_of[x], e_of[x], share), dual, res.status == 0


def place_optimal(
    problem: PlacementProblem,
    node_limit: int = NODE_LIMIT,
    time_limit_s: float | None = None,
    max_vars: int = MAX_VARS,
) -> Placement:
    """Exact min-max rank load by integer programming (scipy ``milp``/HiGHS), per layer.

    Without replicas each expert sits on one rank. With ``redundant`` R the ILP chooses E + R
    copies *and* how tokens split between them (uneven splits allowed), so its optimum bounds
    ``replicate`` from below. For small instances (E x G up to ``max_vars`` binaries).

    Each layer's search stops after ``node_limit`` branch-and-bound nodes: a count, not a time, so
    the same spec gives the same placement on every machine (for one scipy / HiGHS version), as
    golden files need. ``time_limit_s`` (benchmarks) also stops it by the clock, which makes the
    result depend on the machine. A search stopped early gives the better of its incumbent and the
    LPT heuristic, ``bound`` is the solver's dual bound and ``proven_optimal`` is False.
    """
    if problem.experts * problem.ranks > max_vars:
        raise PlacementError(
            "placement.strategy",
            f"optimal is for small instances: {problem.experts} experts x {problem.ranks} ranks "
            f"is over {max_vars} integer variables",
            hint="use balanced or replicate; bench/placement_gap.py measures their gap",
        )
    check_memory(problem, sum(problem.bytes_E))
    layers, proven = [], True
    for layer in range(len(problem.tokens_LE)):
        slots, dual, ok = _milp_layer(problem, layer, node_limit, time_limit_s)
        heuristic = replicate_slots(problem, layer) if problem.redundant else None
        if heuristic is None:
            heuristic = (lpt_pack(problem, problem.load_E(layer), np.arange(problem.experts)),)
            heuristic += (np.arange(problem.experts),)
        best = finish_layer(problem, layer, *heuristic)
        if slots is not None:
            exact = finish_layer(problem, layer, *slots)
            best = exact if max(exact.load_G) <= max(best.load_G) * (1 + 1e-9) else best
        bound = max(dual, lower_bound(problem.load_E(layer), problem.ranks, problem.redundant))
        bound = max(best.load_G) if ok else min(bound, max(best.load_G))
        layers.append(_with_bound(best, bound))
        proven &= ok
    return Placement("optimal", tuple(layers), proven_optimal=proven)


def _with_bound(layer: LayerPlacement, bound: float) -> LayerPlacement:
    from dataclasses import replace

    return replace(layer, bound=bound)


def _eplb_layer(problem: PlacementProblem, layer: int, groups: int) -> LayerPlacement:
    """DeepSeek EPLB on one layer: expert groups -> nodes, replicas within a node, -> GPUs."""
    load_E, node_G = problem.load_E(layer), np.asarray(problem.node_G)
    num_e, nodes, slots = (
        problem.experts,
        int(node_G.max()) + 1,
        problem.experts + problem.redundant,
    )
    hierarchical = groups % nodes == 0 and num_e % groups == 0 and slots % nodes == 0
    if not hierarchical:  # the global policy: one "node" holding every rank
        nodes, groups, node_G = 1, 1, np.zeros_like(node_G)
    group_E = np.arange(num_e) // (num_e // groups)
    node_of_group = balanced_packing(np.bincount(group_E, weights=load_E), nodes)
    slot_g, slot_e = [], []
    for n in range(nodes):
        mine = np.flatnonzero(node_of_group[group_E] == n)
        copies = replica_counts(load_E[mine], slots // nodes)
        phys = np.repeat(mine, copies)
        gpus = np.flatnonzero(node_G == n)
        slot_g.append(gpus[balanced_packing(load_E[phys] / np.repeat(copies, copies), len(gpus))])
        slot_e.append(phys)
    return finish_layer(problem, layer, np.concatenate(slot_g), np.concatenate(slot_e))


def place_eplb(problem: PlacementProblem, groups: int | None = None) -> Placement:
    """DeepSeek's EPLB (github.com/deepseek-ai/EPLB), re-implemented from its description.

    Hierarchical policy when the node count divides ``groups`` (the expert groups of
    group-limited routing, e.g. 8 for DeepSeek-V3; default 1, i.e. the global policy) and the slots: pack groups to nodes by load, replicate
    the hottest experts within each node, pack the node's copies to its GPUs with equal counts.
    Otherwise the global policy (replicate over all slots, pack to all GPUs). Like the original
    it ignores memory caps and may put two copies of one expert on one GPU.
    """
    groups = groups or 1
    return per_layer(problem, "eplb", lambda p, layer: _eplb_layer(p, layer, groups))
