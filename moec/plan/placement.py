"""Expert -> rank placement strategies, each a pure function of a :class:`PlacementProblem`.

Strategies (DESIGN.md §5): ``uniform`` (contiguous blocks), ``balanced`` (LPT packing under a
memory cap), ``replicate`` (copies of hot experts, then LPT), ``affinity`` (co-selected experts on one
node), ``optimal`` (exact ILP, small instances) and ``eplb`` (DeepSeek's hierarchical balancer, as a
baseline). Placing only the ep group's G ranks is enough: other ep groups (edp) are copies.

This module holds the four heuristics, the ``STRATEGIES`` registry and :func:`place`; ``optimal``
and ``eplb`` live in :mod:`moec.plan.placement_reference`, the problem and result types in
:mod:`moec.plan.placement_problem` (legend there), the packing primitives in :mod:`moec.plan.packing`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moec.plan.packing import lpt_pack, replicate_slots
from moec.plan.placement_problem import (
    MEMORY_FIELD,
    LayerPlacement,
    Placement,
    PlacementError,
    PlacementProblem,
    check_memory,
    finish_layer,
    per_layer,
)
from moec.plan.placement_reference import place_eplb, place_optimal
from moec.plan.trace import coselection_EE


def place_uniform(problem: PlacementProblem) -> Placement:
    """Contiguous blocks: expert e on rank ``e * G // E`` (block sizes differ by at most one).

    Ignores ``redundant`` and the trace; raises :class:`PlacementError` if a rank's block
    exceeds the memory cap.
    """
    num_e = problem.experts
    slot_e = np.arange(num_e)
    slot_g = slot_e * problem.ranks // num_e if num_e >= problem.ranks else slot_e
    if problem.mem_cap_bytes is not None:
        mem_G = np.bincount(slot_g, weights=np.asarray(problem.bytes_E), minlength=problem.ranks)
        if mem_G.max() > problem.mem_cap_bytes:
            raise PlacementError(
                MEMORY_FIELD,
                f"rank {int(mem_G.argmax())} needs {mem_G.max() / 2**30:.2f} GiB for its "
                f"contiguous block of experts; the cap is {problem.mem_cap_bytes / 2**30:.2f} GiB",
                hint="use placement.strategy: balanced, or add ranks",
            )
    return per_layer(problem, "uniform", lambda p, layer: finish_layer(p, layer, slot_g, slot_e))


def _balanced_layer(problem: PlacementProblem, layer: int) -> LayerPlacement:
    expert_I = np.arange(problem.experts)
    rank_I = lpt_pack(problem, problem.load_E(layer), expert_I)
    return finish_layer(problem, layer, rank_I, expert_I)


def place_balanced(problem: PlacementProblem) -> Placement:
    """LPT packing of the experts' expected loads (one copy each) under the memory cap."""
    check_memory(problem, sum(problem.bytes_E))
    return per_layer(problem, "balanced", _balanced_layer)


def place_replicate(problem: PlacementProblem) -> Placement:
    """EPLB-style replication: ``redundant`` extra copies go one at a time to the expert with the
    largest load per copy; tokens split evenly over copies; then LPT packing of the copies with no
    two copies of one expert on a rank. Total slots = E + redundant (fewer only if an expert
    already has a copy on every rank)."""
    slots_bytes = sum(problem.bytes_E) + problem.redundant * min(problem.bytes_E)
    check_memory(problem, slots_bytes)
    return per_layer(
        problem, "replicate", lambda p, layer: finish_layer(p, layer, *replicate_slots(p, layer))
    )


def _node_of_experts(problem, load_E, co_EE, slack) -> np.ndarray:
    """Greedy graph partition: experts, heaviest first, go to the node with the largest modularity
    gain (co-selection with its experts above what independent picks would give), among nodes
    whose load stays within ``(1 + slack)`` of their fair share."""
    node_G = np.asarray(problem.node_G)
    gpn_N = np.bincount(node_G).astype(np.float64)
    cap_N = load_E.sum() * gpn_N / gpn_N.sum() * (1.0 + slack)
    count_cap_N = np.ceil(problem.experts * gpn_N / gpn_N.sum() * (1.0 + slack))
    load_N, count_N = np.zeros(len(gpn_N)), np.zeros(len(gpn_N))
    pull_NE = np.zeros((len(gpn_N), problem.experts))
    degree_E = co_EE.sum(1)
    degree_N = np.zeros(len(gpn_N))
    total = max(float(degree_E.sum()), 1e-300)
    node_E = np.empty(problem.experts, dtype=np.int64)
    for e in np.lexsort((np.arange(problem.experts), -load_E)):
        fits = (load_N + load_E[e] <= cap_N) & (count_N < count_cap_N)
        if fits.any():
            gain = pull_NE[:, e] - degree_E[e] * degree_N / total
            score = np.where(fits, gain, -np.inf)
            best = np.flatnonzero(score == score.max())
            n = int(best[np.argmin(load_N[best] / gpn_N[best])])
        else:
            n = int(np.argmin(load_N / gpn_N))
        node_E[e] = n
        load_N[n] += load_E[e]
        count_N[n] += 1
        pull_NE[n] += co_EE[e]
        degree_N[n] += degree_E[e]
    return _refine_by_swaps(node_E, load_E, co_EE, np.maximum(cap_N, load_N))


def _refine_by_swaps(node_E, load_E, co_EE, cap_N, passes: int = 2) -> np.ndarray:
    """Swap pairs of experts between nodes while that raises the co-selection kept inside nodes
    and keeps every node's load under ``cap_N`` (swaps keep the expert counts)."""
    node_E = node_E.copy()
    pull_NE = np.zeros((len(cap_N), len(node_E)))
    np.add.at(pull_NE, node_E, co_EE)  # pull_NE[n, e]: co-selection of e with node n's experts
    load_N = np.bincount(node_E, weights=load_E, minlength=len(cap_N))
    for _ in range(passes):
        swapped = False
        for e in range(len(node_E)):
            a, b_F = node_E[e], node_E
            own_F = pull_NE[b_F, np.arange(len(node_E))]  # each f's pull to its own node
            gain_F = pull_NE[b_F, e] - pull_NE[a, e] + pull_NE[a] - own_F - 2 * co_EE[e]
            delta_F = load_E - load_E[e]  # load node a gains, node b loses, by swapping
            ok = (
                (b_F != a)
                & (load_N[a] + delta_F <= cap_N[a])
                & (load_N[b_F] - delta_F <= cap_N[b_F])
            )
            gain_F = np.where(ok, gain_F, 0.0)
            f = int(np.argmax(gain_F))
            if gain_F[f] <= 1e-9:
                continue
            b = node_E[f]
            node_E[e], node_E[f] = b, a
            pull_NE[a] += co_EE[f] - co_EE[e]
            pull_NE[b] += co_EE[e] - co_EE[f]
            load_N[a] += delta_F[f]
            load_N[b] -= delta_F[f]
            swapped = True
        if not swapped:
            break
    return node_E


def place_affinity(problem: PlacementProblem, slack: float = 0.1) -> Placement:
    """Keep often co-selected experts on one node, then LPT within each node.

    slack: how far above its fair share of load a node may go to keep co-selected experts
    together (0.1 = 10%). One copy per expert. On one node this equals ``balanced``.
    """
    check_memory(problem, sum(problem.bytes_E))
    node_G = np.asarray(problem.node_G)

    def layer_fn(p: PlacementProblem, layer: int) -> LayerPlacement:
        load_E = p.load_E(layer)
        co_EE = coselection_EE(p.trace.layers[layer], p.top_k) if p.trace else None
        if co_EE is None or node_G.max() == 0:
            return _balanced_layer(p, layer)
        node_E = _node_of_experts(p, load_E, co_EE, slack)
        rank_E = np.empty(p.experts, dtype=np.int64)
        for n in range(int(node_G.max()) + 1):
            mine = np.flatnonzero(node_E == n)
            rank_E[mine] = lpt_pack(p, load_E[mine], mine, np.flatnonzero(node_G == n))
        return finish_layer(p, layer, rank_E, np.arange(p.experts))

    return per_layer(problem, "affinity", layer_fn)


STRATEGIES: dict[str, Callable[..., Placement]] = {
    "uniform": place_uniform,
    "balanced": place_balanced,
    "replicate": place_replicate,
    "affinity": place_affinity,
    "optimal": place_optimal,
    "eplb": place_eplb,
}


def place(problem: PlacementProblem, strategy: str, **options) -> Placement:
    """Run a strategy by name (a key of ``STRATEGIES``); options go to the strategy function."""
    if strategy not in STRATEGIES:
        raise PlacementError(
            "placement.strategy",
            f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}",
        )
    return STRATEGIES[strategy](problem, **options)
