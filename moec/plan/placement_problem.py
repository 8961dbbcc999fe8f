"""The placement problem and a strategy's answer, with the pieces every strategy shares.

Legend: E experts, G ranks of one ep group, N nodes, L layers, R redundant (extra) expert slots.
A rank's *load* is the expected compute time of the tokens it serves: ``tokens_e x cost_e`` µs,
split evenly (or, for ``optimal`` with replicas, as the ILP chooses) between an expert's copies.

:class:`PlacementProblem` (built by :func:`make_problem`) is a strategy's input; :class:`Placement`
of :class:`LayerPlacement` its output. :func:`finish_layer` turns a strategy's slots (rank, expert)
into a checked :class:`LayerPlacement` with its loads, bound and inter-node fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moec.errors import FieldError
from moec.plan.cost import OPTIMIZER_BYTES, PROFILES, ExpertShape, GpuProfile, token_cost_us
from moec.plan.trace import Trace, coselection_EE

# The field a memory cap comes from. A named GPU profile ("h100") has no such key in the spec:
# ``place_experts`` then names ``cluster.gpu`` instead.
MEMORY_FIELD = "cluster.gpu.memory_gb"


class PlacementError(FieldError):
    """No placement satisfies the constraints; ``path`` names the spec field to change."""


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
    grad_bytes: float = 2.0,
) -> PlacementProblem:
    """Build a problem from a trace and the experts' shapes (one shape for all, or one per expert).

    train: each copy also holds its grads (``grad_bytes`` per param: the activations' dtype), two
    fp32 Adam moments and an fp32 master (``cost.OPTIMIZER_BYTES``), as ``cost.rank_memory`` counts.
    """
    num = trace.num_experts
    shapes_E = (shapes,) * num if isinstance(shapes, ExpertShape) else tuple(shapes)
    if len(shapes_E) != num:
        raise PlacementError("experts", f"{len(shapes_E)} expert shapes for a {num}-expert trace")
    state = grad_bytes + OPTIMIZER_BYTES if train else 0.0
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


def check_memory(problem: PlacementProblem, bytes_needed: float) -> None:
    cap = problem.mem_cap_bytes
    if cap is not None and bytes_needed > cap * problem.ranks:
        ranks = "1 rank holds" if problem.ranks == 1 else f"{problem.ranks} ranks hold"
        raise PlacementError(
            MEMORY_FIELD,
            f"experts need {bytes_needed / 2**30:.2f} GiB but {ranks} "
            f"{cap * problem.ranks / 2**30:.2f} GiB ({cap / 2**30:.2f} GiB each)",
            hint="add ranks (parallel.ep), lower placement.redundant, or quantise the experts",
        )


def per_layer(problem: PlacementProblem, strategy: str, fn: Callable) -> Placement:
    return Placement(strategy, tuple(fn(problem, layer) for layer in range(len(problem.tokens_LE))))
