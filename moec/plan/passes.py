"""The planner: a fixed, named list of pure passes, with an invariant check after each.

    canonicalize → place_experts → schedule_comm → plan_memory → choose_kernels → estimate_cost

Each pass takes the spec and the plan so far and returns a new plan; none touches the disk or mutates its
input. ``run_passes`` checks the invariants after every pass, so a broken pass fails at its own name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moec.plan import profiles
from moec.plan.ir import (
    CommPlan,
    CostPlan,
    Dims,
    GroupPlan,
    KernelPlan,
    LayerPlacement,
    MemoryPlan,
    Mesh,
    PlacementPlan,
    Plan,
)
from moec.spec import Spec, spec_hash

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def canonicalize(spec: Spec, _: Plan | None) -> Plan:
    """Derive dims, expert groups, the mesh and the MoE layer list; note semantic equivalences."""
    r = spec.router
    expert_in = spec.latent.dim if spec.latent else spec.hidden
    slots = spec.num_experts if r.kind == "expert_choice" else r.top_k
    dims = Dims(
        hidden=spec.hidden,
        experts=spec.num_experts,
        zero_experts=spec.zero_experts,
        top_k=r.top_k,
        slots=slots,
        expert_in=expert_in,
        shared_ffn=spec.shared.ffn if spec.shared else 0,
        router_outputs=spec.num_experts + spec.zero_experts,
    )
    groups, first = [], 0
    for g in spec.experts:
        matrices = 3 if g.kind == "glu" else 2
        groups.append(
            GroupPlan(
                name=g.name,
                first=first,
                count=g.count,
                ffn=g.ffn,
                kind=g.kind,
                activation=g.activation,
                glu=g.glu,
                dtype=g.dtype,
                bias=g.bias,
                bytes_per_param=BYTES[g.dtype],
                params_per_expert=matrices * expert_in * g.ffn,
                flops_per_token=2 * matrices * expert_in * g.ffn,
            )
        )
        first += g.count
    p, c = spec.parallel, spec.cluster
    mesh = Mesh(
        c.nodes * c.gpus_per_node, c.nodes, c.gpus_per_node, p.dp, p.tp, p.ep, p.pp, p.expert_tp
    )
    layers = spec.layers
    moe_layers = tuple(range(layers.first, layers.count, layers.every))
    return Plan(
        name=spec.name,
        spec_hash=spec_hash(spec),
        dims=dims,
        groups=tuple(groups),
        mesh=mesh,
        moe_layers=moe_layers,
        notes=tuple(_equivalences(spec)),
    )


def _equivalences(spec: Spec) -> list[str]:
    """Identities from HF_MOE_SEMANTICS.md §4 that make two spellings one semantic."""
    r, notes = spec.router, []
    if r.topk_on == "logits" and r.score == "softmax" and r.normalize.kind == "sum":
        notes.append(
            "softmax over the k selected logits already sums to 1: renormalisation is a no-op"
        )
    if r.score == "sigmoid" and r.selection_bias == "none" and r.groups is None:
        notes.append("sigmoid is monotone: top-k on scores and on logits select the same experts")
    if r.groups is not None and r.groups.count == 1:
        notes.append("one expert group: group-limited routing is a no-op")
    if r.kind == "sparsemixer":
        notes.append("sparsemixer (eval): both weights are often exactly 1 when eps is small")
    return notes


def place_experts(spec: Spec, plan: Plan) -> Plan:
    """Expert → ep-rank tables per MoE layer (v1: contiguous, uniform expected load)."""
    ep, n, k = plan.mesh.ep, plan.dims.experts, plan.dims.top_k
    per = [n // ep + (1 if r < n % ep else 0) for r in range(ep)]
    ranks, start = [], 0
    for count in per:
        ranks.append(tuple(range(start, start + count)))
        start += count
    load = tuple(
        k * len(ids) / n for ids in ranks
    )  # uniform routing: each expert gets k/n of slots
    imbalance = max(load) / (sum(load) / ep)
    layer = LayerPlacement(tuple(ranks), load, round(imbalance, 6))
    placement = PlacementPlan(
        "uniform", tuple(layer for _ in plan.moe_layers), "uniform assumption"
    )
    return dataclasses.replace(plan, placement=placement)


def schedule_comm(spec: Spec, plan: Plan) -> Plan:
    """Pick the dispatch schedule by predicted time (v1: flat all-to-all, or local when ep == 1)."""
    ep = plan.mesh.ep
    wire = BYTES[spec.comm.wire_dtype]
    tokens = spec.workload.tokens_per_rank
    sent = int(tokens * plan.dims.slots * plan.dims.hidden * wire * (ep - 1) / ep)
    chunks = 1 if spec.comm.chunks == "auto" else spec.comm.chunks
    if ep == 1:
        return dataclasses.replace(plan, comm=CommPlan("local", 1, spec.comm.wire_dtype, 0, {}))
    link = spec.cluster.links.intra if spec.cluster.nodes == 1 else spec.cluster.links.inter
    flat_us = link.latency_us + sent / (link.gbps * 1e3)
    chosen = spec.comm.dispatch if spec.comm.dispatch != "auto" else "all_to_all"
    comm = CommPlan(chosen, chunks, spec.comm.wire_dtype, sent, {"all_to_all": round(flat_us, 3)})
    return dataclasses.replace(plan, comm=comm)


def plan_memory(spec: Spec, plan: Plan) -> Plan:
    """Per-rank bytes: local expert weights, shared/router weights, optimizer state, token buffers."""
    layers = max(1, len(plan.moe_layers) // plan.mesh.pp)
    local = plan.placement.layers[0].ranks if plan.placement and plan.placement.layers else ((),)
    most = max(local, key=len)
    expert_bytes = 0.0
    for g in plan.groups:
        held = sum(1 for e in most if g.first <= e < g.first + g.count)
        expert_bytes += held * g.params_per_expert * g.bytes_per_param / plan.mesh.expert_tp
    h, act = spec.hidden, BYTES[spec.dtype]
    dense = plan.dims.router_outputs * h * 4 + (3 * h * plan.dims.shared_ffn * act)
    trainable = (
        expert_bytes / act * 2 if spec.workload.mode == "train" else 0
    )  # params, as if 2-byte
    optimizer = int(trainable / 2 * 12)  # fp32 master + two Adam moments, 12 bytes per param
    tokens = spec.workload.tokens_per_rank * plan.dims.slots
    buffers = int(2 * tokens * h * act)  # dispatch + combine receive buffers
    widest = max(g.ffn for g in plan.groups)
    activations = int(tokens * 3 * widest * act) if spec.workload.mode == "train" else 0
    per_layer = int(expert_bytes) + int(dense) + optimizer
    total = per_layer * layers + buffers + activations
    capacity = int(profiles.gpu(spec.cluster.gpu).memory_gb * 1e9)
    memory = MemoryPlan(
        expert_weights=int(expert_bytes) * layers,
        shared_and_router=int(dense) * layers,
        optimizer=optimizer * layers,
        token_buffers=buffers,
        activations=activations,
        total=total,
        capacity=capacity,
        fits=total <= capacity,
    )
    return dataclasses.replace(plan, memory=memory)


def choose_kernels(spec: Spec, plan: Plan) -> Plan:
    """Default backend and the GEMM row block for the permutation (tile choice lives in the kernels)."""
    tokens = spec.workload.tokens_per_rank * plan.dims.slots / max(1, plan.dims.experts)
    block_m = 16 if tokens <= 16 else 32 if tokens <= 64 else 64
    notes = ("torch backend on CPU; Triton kernels on CUDA when the package ships them",)
    return dataclasses.replace(plan, kernels=KernelPlan("torch", block_m, notes))


def estimate_cost(spec: Spec, plan: Plan) -> Plan:
    """Roofline time of the experts on one rank plus the comm phases, for one MoE layer forward."""
    gpu = profiles.gpu(spec.cluster.gpu)
    n, k, tokens = plan.dims.experts, plan.dims.top_k, spec.workload.tokens_per_rank
    share = {g.name: g.count / n for g in plan.groups}
    flops_tok = sum(share[g.name] * g.flops_per_token for g in plan.groups) * k
    ranks = plan.placement.layers[0].ranks if plan.placement.layers else ((),)
    held = max(ranks, key=len)
    weight_bytes = 0
    for g in plan.groups:
        count = sum(1 for e in held if g.first <= e < g.first + g.count)
        weight_bytes += int(count * g.params_per_expert * g.bytes_per_param)
    compute_us = tokens * flops_tok / (gpu.tflops_bf16 * 1e12) * 1e6
    memory_us = weight_bytes / (gpu.hbm_gbps * 1e9) * 1e6
    experts_us = max(compute_us, memory_us)
    comm_us = plan.comm.predicted_us.get(plan.comm.dispatch, 0.0) if plan.comm else 0.0
    phases = {"dispatch": comm_us, "experts": experts_us, "combine": comm_us}
    phases = {name: round(us, 3) for name, us in phases.items()}
    cost = CostPlan(phases, round(sum(phases.values()), 3), int(flops_tok), weight_bytes)
    return dataclasses.replace(plan, cost=cost)


Pass = Callable[[Spec, Plan | None], Plan]
PASSES: tuple[Pass, ...] = (
    canonicalize,
    place_experts,
    schedule_comm,
    plan_memory,
    choose_kernels,
    estimate_cost,
)


class PlanInvariantError(AssertionError):
    """A pass produced a plan that breaks an invariant: a moec bug, not a user error."""


def check_invariants(spec: Spec, plan: Plan) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PlanInvariantError(what)

    need(sum(g.count for g in plan.groups) == plan.dims.experts, "groups cover every expert once")
    firsts = [sum(h.count for h in plan.groups[:i]) for i in range(len(plan.groups))]
    need([g.first for g in plan.groups] == firsts, "groups are contiguous, in spec order")
    need(plan.mesh.world == plan.mesh.dp * plan.mesh.tp * plan.mesh.pp, "mesh world = dp*tp*pp")
    if plan.placement is not None:
        need(len(plan.placement.layers) == len(plan.moe_layers), "one placement per MoE layer")
        for layer in plan.placement.layers:
            need(len(layer.ranks) == plan.mesh.ep, "one expert list per ep rank")
            placed = {e for ids in layer.ranks for e in ids}
            need(placed == set(range(plan.dims.experts)), "every expert placed")
            need(
                all(len(set(ids)) == len(ids) for ids in layer.ranks),
                "no duplicate expert on a rank",
            )
    if plan.memory is not None:
        parts = plan.memory.token_buffers + plan.memory.activations
        need(plan.memory.total >= parts, "memory total covers its parts")
    if plan.cost is not None:
        need(all(us >= 0 for us in plan.cost.phases_us.values()), "phase times are non-negative")


def run_passes(spec: Spec, trace: Callable[[str, Plan], None] | None = None) -> Plan:
    """Run every pass in order, checking invariants after each; ``trace`` sees each intermediate plan."""
    plan: Plan | None = None
    for step in PASSES:
        plan = step(spec, plan)
        try:
            check_invariants(spec, plan)
        except PlanInvariantError as exc:
            raise PlanInvariantError(f"after pass {step.__name__}: {exc}") from None
        if trace is not None:
            trace(step.__name__, plan)
    return plan
