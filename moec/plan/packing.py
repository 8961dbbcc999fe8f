"""Packing primitives of the placement strategies: LPT packing under a memory cap, replica
counts (D'Hondt apportionment), the replicate strategy's slots, and EPLB's balanced packing.

Legend as in :mod:`moec.plan.placement_problem`; ``_I`` indexes items (expert copies).
"""

from __future__ import annotations

import heapq

import numpy as np

from moec.plan.placement_problem import MEMORY_FIELD, PlacementError, PlacementProblem


def lpt_pack(problem, load_I, expert_I, ranks=None, load_G=None):
    """Longest-processing-time packing: each item, heaviest first, to the least-loaded rank
    that has memory room and does not already hold that expert. Returns the rank of each item.

    load_I / expert_I: items' loads and expert ids. ranks: the ranks to use (default all).
    load_G: starting loads. Ties go to the rank holding fewer items, then the lower index.
    """
    ranks = list(range(problem.ranks)) if ranks is None else list(ranks)
    bytes_E, cap = problem.bytes_E, problem.mem_cap_bytes
    used = dict.fromkeys(ranks, 0.0)
    held: dict[int, set[int]] = {g: set() for g in ranks}
    order = np.lexsort((expert_I, -np.asarray(load_I)))
    rank_I = np.empty(len(load_I), dtype=np.int64)
    first = _first_round(problem, load_I, expert_I, order, ranks) if load_G is None else 0
    for i, g in zip(order[:first].tolist(), ranks, strict=False):
        rank_I[i] = g
        used[g] = bytes_E[int(expert_I[i])]
        held[g].add(int(expert_I[i]))
    heap = [(0.0 if load_G is None else float(load_G[g]), 0, g) for g in ranks[first:]]
    heap += [(float(load_I[i]), 1, g) for i, g in zip(order[:first].tolist(), ranks, strict=False)]
    heapq.heapify(heap)
    for i in order[first:]:
        e, skipped = int(expert_I[i]), []
        while heap:
            load, count, g = heapq.heappop(heap)
            if e not in held[g] and (cap is None or used[g] + bytes_E[e] <= cap):
                break
            skipped.append((load, count, g))
        else:
            raise PlacementError(
                MEMORY_FIELD,
                f"expert {e} ({bytes_E[e] / 2**30:.2f} GiB) fits on no rank under the memory cap",
                hint="add ranks, lower placement.redundant, or quantise the experts",
            )
        rank_I[i] = g
        used[g] += bytes_E[e]
        held[g].add(e)
        heapq.heappush(heap, (load + float(load_I[i]), count + 1, g))
        for item in skipped:
            heapq.heappush(heap, item)
    return rank_I


def _first_round(problem, load_I, expert_I, order, ranks) -> int:
    """How many of the heaviest items LPT would simply deal one per rank, in rank order (all ranks
    start empty, so the k-th heaviest item goes to the k-th rank while each fits its cap)."""
    first = min(len(order), len(ranks))
    if problem.mem_cap_bytes is not None:
        fits = np.asarray(problem.bytes_E)[np.asarray(expert_I)[order[:first]]]
        bad = np.flatnonzero(fits > problem.mem_cap_bytes)
        first = int(bad[0]) if bad.size else first
    return first


def replica_counts(load_E: np.ndarray, slots: int, max_copies: int | None = None) -> np.ndarray:
    """Copies per expert: one each, then each extra slot to the expert with the largest load per
    copy (ties: lower id), never more than ``max_copies`` copies of one expert.

    This is D'Hondt's apportionment, so it can start from ``max(1, floor(load / (total / R)))``
    copies (never more than the greedy result gives) and run the heap only for the remainder.
    """
    load_E = np.asarray(load_E, dtype=np.float64)
    extra, total = slots - len(load_E), float(load_E.sum())
    copies = np.ones(len(load_E), dtype=np.int64)
    if extra > 0 and total > 0:
        copies = np.maximum(1, np.floor(load_E * (extra / total))).astype(np.int64)
    if max_copies is not None:
        copies = np.minimum(copies, max_copies)
    open_E = np.flatnonzero(copies < (max_copies or np.iinfo(np.int64).max))
    heap = list(zip((-load_E[open_E] / copies[open_E]).tolist(), open_E.tolist(), strict=True))
    heapq.heapify(heap)
    for _ in range(slots - int(copies.sum())):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if max_copies is None or copies[e] < max_copies:
            heapq.heappush(heap, (-float(load_E[e]) / copies[e], e))
    return copies


def replicate_slots(problem: PlacementProblem, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The replicate strategy's slots of one layer: ``(rank_I, expert_I)``."""
    load_E = problem.load_E(layer)
    copies = replica_counts(load_E, problem.experts + problem.redundant, problem.ranks)
    expert_I = np.repeat(np.arange(problem.experts), copies)
    rank_I = lpt_pack(problem, load_E[expert_I] / copies[expert_I], expert_I)
    return rank_I, expert_I


def balanced_packing(weight_I: np.ndarray, packs: int) -> np.ndarray:
    """EPLB's packing: items, heaviest first, to the lightest pack that still has room; each pack
    holds ``ceil(items / packs)`` items at most. Returns the pack of each item."""
    per_pack = -(-len(weight_I) // packs)
    heap = [(0.0, p) for p in range(packs)]  # (load, pack); full packs leave the heap
    count_P = [0] * packs
    pack_I = np.empty(len(weight_I), dtype=np.int64)
    for i in np.lexsort((np.arange(len(weight_I)), -weight_I)).tolist():
        load, p = heapq.heappop(heap)
        pack_I[i] = p
        count_P[p] += 1
        if count_P[p] < per_pack:
            heapq.heappush(heap, (load + float(weight_I[i]), p))
    return pack_I
