"""The plan: everything moec decided about a spec, as frozen plain data.

Legend for shape suffixes used across moec and the generated code:
    T tokens, H hidden, F expert width, E experts, Z zero (identity) experts, K top-k slots per token,
    G ranks, L layers.

Units: bytes are bytes, times are microseconds (``_us``), rates are per second. ``Plan.to_json()`` is what
``moec plan --json`` prints and what ``generated/<name>/plan.json`` holds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

PLAN_FORMAT = 1
LEGEND = "T tokens, H hidden, F expert width, E experts, Z zero experts, K top-k, G ranks, L layers"


@dataclass(frozen=True)
class GroupPlan:
    """One expert group: global ids [first, first + count)."""

    name: str
    first: int
    count: int
    ffn: int
    kind: str  # "glu" | "mlp"
    activation: str
    glu: str
    dtype: str
    bias: bool
    bytes_per_param: float
    params_per_expert: int
    flops_per_token: int  # one token through one expert, forward (2 per multiply-add)


@dataclass(frozen=True)
class Dims:
    hidden: int
    experts: int  # routed experts with weights
    zero_experts: int
    top_k: int
    slots: int  # routing slots per token as returned by route(): K, or E for expert choice
    expert_in: int  # the experts' input width: H, or the latent dim
    shared_ffn: int  # 0 when there is no shared expert
    router_outputs: int  # E + Z


@dataclass(frozen=True)
class Mesh:
    """Ranks: attention layers ordered (pp, dp, tp), experts (pp, edp, ep, expert_tp); innermost last."""

    world: int
    nodes: int
    gpus_per_node: int
    dp: int
    tp: int
    ep: int
    pp: int
    expert_tp: int
    edp: int  # copies of one ep group: world / (pp * ep * expert_tp)
    ep_groups: tuple[tuple[int, ...], ...]  # global ranks of each ep group, by ep rank
    ep_spans_nodes: bool


@dataclass(frozen=True)
class LayerPlacement:
    """Which experts each expert-parallel rank holds for one MoE layer (an id may repeat on ranks)."""

    ranks: tuple[tuple[int, ...], ...]  # [ep rank] -> expert ids, ascending
    shares: tuple[tuple[float, ...], ...]  # [ep rank][i] -> share of expert ranks[g][i]'s tokens
    load_us: tuple[float, ...]  # expected expert compute per ep rank, µs per MoE layer forward
    memory: tuple[int, ...]  # expert weight bytes per ep rank (+ grads and optimizer state: train)
    imbalance: float  # max / mean of load_us


@dataclass(frozen=True)
class PlacementPlan:
    strategy: str
    layers: tuple[LayerPlacement, ...]
    source: str  # "uniform routing (no trace)" or the trace path
    gap: float  # worst layer's max load over a lower bound, minus 1
    pick_probs: tuple[float, ...]  # probability that one top-k pick is each expert (first layer)


@dataclass(frozen=True)
class CommPlan:
    dispatch: str  # "local" | "all_to_all" | "hierarchical" | "all_gather"
    chunks: int  # token chunks pipelined through dispatch → experts → combine
    wire_dtype: str
    bytes_per_rank: int  # dispatch bytes the busiest rank sends per MoE layer (combine: the same)
    predicted_us: dict[str, float] = field(default_factory=dict)  # one-way time per candidate


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one pipeline stage's MoE layers."""

    expert_weights: int
    shared_and_router: int
    optimizer: int
    token_buffers: int
    activations: int
    total: int
    capacity: int
    fits: bool


@dataclass(frozen=True)
class KernelPlan:
    """What the Triton backend runs: which parts have kernels, and the tuned tile tables."""

    routing_kernel: bool  # the fused routing kernel covers this router (else the torch router)
    expert_kernel_groups: tuple[str, ...]  # groups run by the grouped GEMMs
    tuning_source: str | None  # the moec tune file, or None: the kernels' heuristic
    tuning: tuple[
        tuple[tuple[int, int, int, int, str], tuple[tuple[int, dict], ...]], ...
    ]  # (H, F, E, K, weights) -> buckets
    # (group, H, F, E, K, weights): the shapes a group's kernel calls see on a rank (E the experts
    # a rank holds, per layer; F a rank's expert-tp slice); what moec tune tunes, and what tuning
    # tables are matched against
    shapes: tuple[tuple[str, int, int, int, int, str], ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class CostPlan:
    """Predicted time of one MoE layer's forward on one rank, by phase."""

    phases_us: dict[str, float]
    total_us: float
    flops_per_token: int
    weight_bytes_per_rank: int


@dataclass(frozen=True)
class Plan:
    name: str
    spec_hash: str
    dims: Dims
    groups: tuple[GroupPlan, ...]
    mesh: Mesh
    moe_layers: tuple[int, ...]  # decoder layer indices that are MoE
    notes: tuple[str, ...]  # canonicalisations and equivalences the planner applied
    placement: PlacementPlan | None = None
    comm: CommPlan | None = None
    memory: MemoryPlan | None = None
    kernels: KernelPlan | None = None
    cost: CostPlan | None = None
    format: int = PLAN_FORMAT
    legend: str = LEGEND

    def to_dict(self) -> dict:
        return _plain(self)

    def to_json(self) -> str:
        """Sorted keys, one key per line; lists of numbers stay on one line (placement tables of
        thousands of ranks stay readable and fast to write)."""
        return _dump(self.to_dict(), "") + "\n"


def _plain(value):
    """dataclasses.asdict without its deep copies: frozen plans hold only tuples, dicts and scalars."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _dump(value, indent: str) -> str:
    inner = indent + " "
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{inner}{json.dumps(k)}: {_dump(value[k], inner)}" for k in sorted(value))
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return json.dumps(value, separators=(", ", ": "))
        return "[\n" + ",\n".join(inner + _dump(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value)
