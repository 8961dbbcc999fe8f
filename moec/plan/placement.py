"""Expert -> rank placement strategies, each a pure function of a :class:`PlacementProblem`.

Legend: E experts, G ranks of one ep group, N nodes, L layers, R redundant (extra) expert slots.
A rank's *load* is the expected compute time of the tokens it serves: ``tokens_e x cost_e`` µs,
split evenly (or, for ``optimal`` with replicas, as the ILP chooses) between an expert's copies.

Strategies (DESIGN.md §5): ``uniform`` (contiguous blocks), ``balanced`` (LPT packing under a
memory cap), ``replicate`` (copies of hot experts, then LPT), ``affinity`` (co-selected experts on one
node), ``optimal`` (exact ILP, small instances) and ``eplb`` (DeepSeek's hierarchical balancer, as a
baseline). Placing only the ep group's G ranks is enough: other ep groups (edp) are copies.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moec.errors import MoecError
from moec.plan.cost import PROFILES, ExpertShape, GpuProfile, token_cost_us
from moec.plan.trace import Trace, coselection_EE


class PlacementError(MoecError):
    """No placement satisfies the constraints; ``path`` names the spec field to change."""

    def __init__(self, path: str, message: str, hint: str | None = None):
        self.path, self.message, self.hint = path, message, hint
        super().__init__(f"{path}: {message}" + (f"\n  hint: {hint}" if hint else ""))


@dataclass(frozen=True)
class PlacementProblem:
    """Everything a strategy needs; build it with :func:`make_problem`.

    tokens_LE: expected (token, expert) assignments per layer and expert.
    cost_E: µs of compute per token on each expert (width and precision aware).
    bytes_E: resident bytes of one copy of each expert (weights, plus optimizer state in training).
    node_G: node of each rank of the ep group, numbered 0..N-1 (G = len(node_G)).
    redundant: R extra slots for copies (``replicate``, ``eplb``, ``optimal``).
    mem_cap_bytes: bytes a rank may spend on experts (None: unlimited).
    trace: the routing trace, for co-selection (``affinity`` and the inter-node fraction).
    top_k: K, used to estimate co-selection when the trace has no pairs.
    """

    tokens_LE: tuple[tuple[float, ...], ...]
    cost_E: tuple[float, ...]
    bytes_E: tuple[float, ...]
    node_G: tuple[int, ...]
    redundant: int = 0
    mem_cap_bytes: float | None = None
    trace: Trace | None = None
    top_k: int = 2

    @property
    def ranks(self) -> int:
        return len(self.node_G)

    @property
    def experts(self) -> int:
        return len(self.cost_E)

    def load_E(self, layer: int) -> np.ndarray:
        """Expected µs of compute per expert in one layer: tokens x cost."""
        return np.asarray(self.tokens_LE[layer]) * np.asarray(self.cost_E)


def make_problem(
    trace: Trace,
    shapes: ExpertShape | tuple[ExpertShape, ...],
    node_G: tuple[int, ...],
    gpu: GpuProfile = PROFILES["h100"],
    redundant: int = 0,
    mem_cap_bytes: float | None = None,
    train: bool = False,
    top_k: int = 2,
) -> PlacementProblem:
    """Build a problem from a trace and the experts' shapes (one shape for all, or one per expert).

    train: each copy also holds bf16 grads, two fp32 Adam moments and an fp32 master (14 B/param).
    """
    num = trace.num_experts
    shapes_E = (shapes,) * num if isinstance(shapes, ExpertShape) else tuple(shapes)
    if len(shapes_E) != num:
        raise PlacementError("experts", f"{len(shapes_E)} expert shapes for a {num}-expert trace")
    state = 14.0 if train else 0.0
    return PlacementProblem(
        tokens_LE=tuple(layer.counts_E for layer in trace.layers),
        cost_E=tuple(token_cost_us(s, gpu) for s in shapes_E),
        bytes_E=tuple(s.weight_bytes + state * s.params for s in shapes_E),
        node_G=tuple(node_G),
        redundant=redundant,
        mem_cap_bytes=mem_cap_bytes,
        trace=trace,
        top_k=top_k,
    )


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's placement.

    ranks[g]: expert ids on rank g, ascending (an id may appear on several ranks).
    shares[g][i]: fraction of expert ``ranks[g][i]``'s tokens served by that copy.
    load_G: expected compute µs per rank; memory_G: expert bytes per rank.
    imbalance: max / mean of load_G. bound: a lower bound on max(load_G) (µs).
    inter_node_fraction: share of co-selection weight between experts with no node in common
    (None on one node) — with node-de-duplicated dispatch, lower means fewer inter-node bytes.
    """

    ranks: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...]
    load_G: tuple[float, ...]
    memory_G: tuple[float, ...]
    imbalance: float
    bound: float
    inter_node_fraction: float | None

    @property
    def slots(self) -> int:
        return sum(len(r) for r in self.ranks)

    def copies_E(self, num_experts: int) -> np.ndarray:
        """Copies of each expert."""
        flat = [e for r in self.ranks for e in r]
        return np.bincount(np.asarray(flat, dtype=np.int64), minlength=num_experts)

    def share_EG(self, num_experts: int) -> np.ndarray:
        """Token share ``[E, G]`` of each expert on each rank; rows sum to 1."""
        out = np.zeros((num_experts, len(self.ranks)))
        for g, (ids, shares) in enumerate(zip(self.ranks, self.shares, strict=True)):
            np.add.at(out[:, g], list(ids), shares)  # EPLB may stack two copies on one rank
        return out


@dataclass(frozen=True)
class Placement:
    """A strategy's placement of every layer. ``proven_optimal``: set by ``optimal`` only."""

    strategy: str
    layers: tuple[LayerPlacement, ...]
    proven_optimal: bool | None = None

    @property
    def imbalance(self) -> float:
        """Worst layer's max / mean rank load."""
        return max(layer.imbalance for layer in self.layers)

    @property
    def gap(self) -> float:
        """Worst layer's ``max(load_G) / bound - 1``: how far from optimal at most."""
        return max(max(la.load_G) / la.bound - 1.0 if la.bound > 0 else 0.0 for la in self.layers)


# ---------------------------------------------------------------- shared pieces


def finish_layer(problem: PlacementProblem, layer: int, slot_g, slot_e, slot_share=None):
    """Turn slots (rank, expert[, share]) into a :class:`LayerPlacement` and check it.

    slot_share: token share of each slot; default splits an expert evenly over its copies.
    """
    num_e, num_g = problem.experts, problem.ranks
    slot_g, slot_e = np.asarray(slot_g, dtype=np.int64), np.asarray(slot_e, dtype=np.int64)
    copies_E = np.bincount(slot_e, minlength=num_e)
    if np.any(copies_E == 0):
        raise AssertionError(f"moec bug: experts {np.flatnonzero(copies_E == 0)[:5]} unplaced")
    share = 1.0 / copies_E[slot_e] if slot_share is None else np.asarray(slot_share, dtype=float)
    load_E = problem.load_E(layer)
    load_G = np.bincount(slot_g, weights=load_E[slot_e] * share, minlength=num_g)
    memory_G = np.bincount(slot_g, weights=np.asarray(problem.bytes_E)[slot_e], minlength=num_g)
    order = np.lexsort((slot_e, slot_g))
    cuts = np.searchsorted(slot_g[order], np.arange(num_g + 1))
    es, ss = slot_e[order].tolist(), share[order].tolist()
    mean = load_G.mean()
    return LayerPlacement(
        ranks=tuple(tuple(es[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)),
        shares=tuple(tuple(ss[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)),
        load_G=tuple(load_G.tolist()),
        memory_G=tuple(memory_G.tolist()),
        imbalance=float(load_G.max() / mean) if mean > 0 else 1.0,
        bound=lower_bound(load_E, num_g, len(slot_e) - num_e),
        inter_node_fraction=inter_node_fraction(problem, layer, slot_g, slot_e),
    )


def lower_bound(load_E: np.ndarray, ranks: int, redundant: int) -> float:
    """A lower bound on the max rank load: the mean, and the hottest expert split as far as the
    copies allow (``1 + redundant`` copies at most, ``ranks`` at most)."""
    mean = float(load_E.sum()) / ranks
    return max(mean, float(load_E.max()) / min(ranks, 1 + redundant))


def inter_node_fraction(problem, layer, slot_g, slot_e) -> float | None:
    """Share of the layer's co-selection weight between experts that share no node."""
    node_G = np.asarray(problem.node_G)
    nodes = int(node_G.max()) + 1
    if nodes == 1 or problem.trace is None:
        return None
    co_EE = coselection_EE(problem.trace.layers[layer], problem.top_k)
    total = co_EE.sum()
    if total <= 0:
        return None
    member_EN = np.zeros((problem.experts, nodes), dtype=np.float32)
    member_EN[slot_e, node_G[slot_g]] = 1.0
    apart = (member_EN @ member_EN.T) == 0
    return float(co_EE[apart].sum() / total)


def _check_memory(problem: PlacementProblem, bytes_needed: float) -> None:
    cap = problem.mem_cap_bytes
    if cap is not None and bytes_needed > cap * problem.ranks:
        raise PlacementError(
            "cluster.gpu.memory",
            f"experts need {bytes_needed / 2**30:.2f} GiB but {problem.ranks} ranks hold "
            f"{cap * problem.ranks / 2**30:.2f} GiB ({cap / 2**30:.2f} GiB each)",
            hint="add ranks (parallel.ep), lower placement.redundant, or quantise the experts",
        )


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
                "cluster.gpu.memory",
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


def _per_layer(problem: PlacementProblem, strategy: str, fn: Callable) -> Placement:
    return Placement(strategy, tuple(fn(problem, layer) for layer in range(len(problem.tokens_LE))))


# ---------------------------------------------------------------- strategies


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
                "cluster.gpu.memory",
                f"rank {int(mem_G.argmax())} needs {mem_G.max() / 2**30:.2f} GiB for its "
                f"contiguous block of experts; the cap is {problem.mem_cap_bytes / 2**30:.2f} GiB",
                hint="use placement.strategy: balanced, or add ranks",
            )
    return _per_layer(problem, "uniform", lambda p, layer: finish_layer(p, layer, slot_g, slot_e))


def _balanced_layer(problem: PlacementProblem, layer: int) -> LayerPlacement:
    expert_I = np.arange(problem.experts)
    rank_I = lpt_pack(problem, problem.load_E(layer), expert_I)
    return finish_layer(problem, layer, rank_I, expert_I)


def place_balanced(problem: PlacementProblem) -> Placement:
    """LPT packing of the experts' expected loads (one copy each) under the memory cap."""
    _check_memory(problem, sum(problem.bytes_E))
    return _per_layer(problem, "balanced", _balanced_layer)


def replicate_slots(problem: PlacementProblem, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The replicate strategy's slots of one layer: ``(rank_I, expert_I)``."""
    load_E = problem.load_E(layer)
    copies = replica_counts(load_E, problem.experts + problem.redundant, problem.ranks)
    expert_I = np.repeat(np.arange(problem.experts), copies)
    rank_I = lpt_pack(problem, load_E[expert_I] / copies[expert_I], expert_I)
    return rank_I, expert_I


def place_replicate(problem: PlacementProblem) -> Placement:
    """EPLB-style replication: ``redundant`` extra copies go one at a time to the expert with the
    largest load per copy; tokens split evenly over copies; then LPT packing of the copies with no
    two copies of one expert on a rank. Total slots = E + redundant (fewer only if an expert
    already has a copy on every rank)."""
    slots_bytes = sum(problem.bytes_E) + problem.redundant * min(problem.bytes_E)
    _check_memory(problem, slots_bytes)
    return _per_layer(
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
    _check_memory(problem, sum(problem.bytes_E))
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

    return _per_layer(problem, "affinity", layer_fn)


# ---------------------------------------------------------------- exact and baseline


def _milp_layer(problem: PlacementProblem, layer: int, time_limit_s: float):
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
        options={"time_limit": time_limit_s, "mip_rel_gap": 1e-6},
    )
    dual = float(getattr(res, "mip_dual_bound", None) or 0.0)
    if res.x is None:
        return None, dual, False
    x = np.round(res.x[:n_x]).astype(bool)
    y = res.x[y_col][x].clip(0.0)
    share = y / np.bincount(e_of[x], weights=y, minlength=num_e)[e_of[x]]
    return (g_of[x], e_of[x], share), dual, res.status == 0


def place_optimal(
    problem: PlacementProblem, time_limit_s: float = 10.0, max_vars: int = 20_000
) -> Placement:
    """Exact min-max rank load by integer programming (scipy ``milp``/HiGHS), per layer.

    Without replicas each expert sits on one rank. With ``redundant`` R the ILP chooses E + R
    copies *and* how tokens split between them (uneven splits allowed), so its optimum bounds
    ``replicate`` from below. For small instances (E x G up to a few hundred variables): each
    layer stops after ``time_limit_s``; the result is then the better of the ILP's incumbent and
    the LPT heuristic, ``bound`` is the solver's dual bound and ``proven_optimal`` is False.
    Refuses instances with more than ``max_vars`` binaries (E x G).
    """
    if problem.experts * problem.ranks > max_vars:
        raise PlacementError(
            "placement.strategy",
            f"optimal is for small instances: {problem.experts} experts x {problem.ranks} ranks "
            f"is over {max_vars} integer variables",
            hint="use balanced or replicate; bench/placement_gap.py measures their gap",
        )
    _check_memory(problem, sum(problem.bytes_E))
    layers, proven = [], True
    for layer in range(len(problem.tokens_LE)):
        slots, dual, ok = _milp_layer(problem, layer, time_limit_s)
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
    return _per_layer(problem, "eplb", lambda p, layer: _eplb_layer(p, layer, groups))


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
