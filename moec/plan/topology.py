"""The device mesh: which global rank plays which role in each parallel dimension.

Legend: G ranks in the world (``nodes * gpus_per_node``), N nodes.

Two layouts share one world (DESIGN.md §5 "Mesh"):

- attention / dense layers: ``world = pp * dp * tp``, ordered ``(pp, dp, tp)`` with tp innermost,
  so a tp group is a block of consecutive ranks and stays inside a node;
- experts: ``world = pp * edp * ep * expert_tp``, ordered ``(pp, edp, ep, expert_tp)``, so expert-tp
  is innermost and ep comes next: an ep group is consecutive ranks and fits in one node whenever
  ``ep * expert_tp <= gpus_per_node``. ``edp`` (expert data parallel, the copies of one ep group)
  is derived: ``world / (pp * ep * expert_tp)``.

A rank's node is ``rank // gpus_per_node``. Every function is pure and needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.errors import FieldError

Groups = tuple[tuple[int, ...], ...]


class TopologyError(FieldError):
    """A mesh that cannot be built; names the spec field (``parallel.ep``) that is wrong."""


@dataclass(frozen=True)
class Mesh:
    """A validated layout of ``nodes * gpus_per_node`` ranks; build with :func:`make_mesh`."""

    nodes: int
    gpus_per_node: int
    dp: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    expert_tp: int = 1

    @property
    def world(self) -> int:
        """Number of ranks G."""
        return self.nodes * self.gpus_per_node

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: how many copies of one ep group the world holds."""
        return self.world // (self.pp * self.ep * self.expert_tp)

    @property
    def ep_spans_nodes(self) -> bool:
        """True when one ep group crosses a node boundary (its all-to-all uses inter-node links)."""
        return self.ep * self.expert_tp > self.gpus_per_node

    def node_of(self, rank: int) -> int:
        """Node index of a global rank."""
        return rank // self.gpus_per_node

    def node_of_G(self) -> tuple[int, ...]:
        """Node index of every rank, ``node_of_G[g]``."""
        return tuple(g // self.gpus_per_node for g in range(self.world))

    def groups(self, kind: str) -> Groups:
        """Ranks of each process group of one kind, in rank order inside each group.

        kind: ``tp``, ``dp``, ``pp`` (attention layout) or ``ep``, ``expert_tp``, ``edp``
        (expert layout). Returns one tuple of global ranks per group; groups of one kind are
        disjoint and cover the world.
        """
        shapes = {
            "tp": ((self.pp, self.dp, self.tp), 2),
            "dp": ((self.pp, self.dp, self.tp), 1),
            "pp": ((self.pp, self.dp, self.tp), 0),
            "expert_tp": ((self.pp, self.edp, self.ep, self.expert_tp), 3),
            "ep": ((self.pp, self.edp, self.ep, self.expert_tp), 2),
            "edp": ((self.pp, self.edp, self.ep, self.expert_tp), 1),
        }
        if kind not in shapes:
            raise ValueError(f"unknown group kind {kind!r}; expected one of {sorted(shapes)}")
        dims, axis = shapes[kind]
        return _groups_along(dims, axis)

    def ep_nodes(self) -> tuple[int, ...]:
        """Node of each member of the first ep group, indexed by ep rank (the placement's G)."""
        return tuple(self.node_of(r) for r in self.groups("ep")[0])


def _groups_along(dims: tuple[int, ...], axis: int) -> Groups:
    """Groups of a row-major grid of ranks with shape ``dims`` that vary only along ``axis``."""
    strides = [1] * len(dims)
    for i in range(len(dims) - 2, -1, -1):
        strides[i] = strides[i + 1] * dims[i + 1]
    world = strides[0] * dims[0]
    step = strides[axis]
    seen: set[int] = set()
    out = []
    for base in range(world):
        if base in seen:
            continue
        group = tuple(base + i * step for i in range(dims[axis]))
        seen.update(group)
        out.append(group)
    return tuple(out)


def make_mesh(
    nodes: int,
    gpus_per_node: int,
    dp: int = 1,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    expert_tp: int = 1,
) -> Mesh:
    """Validate the parallel degrees against the cluster and return the :class:`Mesh`.

    Raises :class:`TopologyError` with the offending field path (``cluster.nodes``,
    ``parallel.tp``, ``parallel.ep`` …) when a degree is not positive, when
    ``pp * dp * tp`` differs from the world, when tp does not fit in a node, or when
    ``ep * expert_tp`` does not divide ``world / pp``.
    """
    for path, value in (
        ("cluster.nodes", nodes),
        ("cluster.gpus_per_node", gpus_per_node),
        ("parallel.dp", dp),
        ("parallel.tp", tp),
        ("parallel.ep", ep),
        ("parallel.pp", pp),
        ("parallel.expert_tp", expert_tp),
    ):
        if not isinstance(value, int) or value < 1:
            raise TopologyError(path, f"must be a positive integer (got {value!r})")
    world = nodes * gpus_per_node
    if pp * dp * tp != world:
        raise TopologyError(
            "parallel.dp",
            f"pp * dp * tp must equal the world size {world} (got {pp} * {dp} * {tp} = {pp * dp * tp})",
            hint=f"set dp to {world // (pp * tp)}" if world % (pp * tp) == 0 else None,
        )
    if tp > gpus_per_node or gpus_per_node % tp:
        raise TopologyError(
            "parallel.tp",
            f"must divide gpus_per_node ({gpus_per_node}) so a tp group stays in one node (got {tp})",
        )
    if (world // pp) % (ep * expert_tp):
        raise TopologyError(
            "parallel.ep",
            f"ep * expert_tp must divide world / pp = {world // pp} (got {ep} * {expert_tp})",
        )
    if expert_tp > gpus_per_node or gpus_per_node % expert_tp:
        raise TopologyError(
            "parallel.expert_tp",
            f"must divide gpus_per_node ({gpus_per_node}) (got {expert_tp})",
        )
    return Mesh(nodes, gpus_per_node, dp, tp, ep, pp, expert_tp)


def check_experts_fit(num_experts: int, redundant: int, ep: int) -> None:
    """Check that the expert slots (``num_experts + redundant``) can populate ``ep`` ranks.

    Experts need not divide ranks evenly (some ranks then hold one slot more), but a rank with no
    expert would idle, so ``num_experts + redundant >= ep`` is required; replicas must also fit
    (no expert can have more copies than there are ranks).
    """
    if num_experts < 1:
        raise TopologyError("experts", f"need at least one expert (got {num_experts})")
    if redundant < 0:
        raise TopologyError("placement.redundant", f"must be >= 0 (got {redundant})")
    slots = num_experts + redundant
    if slots < ep:
        raise TopologyError(
            "parallel.ep",
            f"{ep} ep ranks but only {slots} expert slots ({num_experts} experts + {redundant} "
            "redundant): some ranks would hold no expert",
            hint=f"lower ep or set placement.redundant to at least {ep - num_experts}",
        )
    if redundant > num_experts * (ep - 1):
        raise TopologyError(
            "placement.redundant",
            f"{redundant} replicas cannot fit: each expert has at most {ep} copies on {ep} ranks",
        )
