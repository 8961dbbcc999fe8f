"""The passes that decide what each ep rank holds: ``place_experts`` (expert -> rank tables, by
the spec's placement strategy and routing trace) and ``plan_memory`` (the busiest rank's bytes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moec.errors import FieldError
from moec.plan import cost, topology
from moec.plan import trace as trace_mod
from moec.plan.canonical import BYTES, expert_shapes, gpu_profile
from moec.plan.ir import LayerPlacement, MemoryPlan, PlacementPlan, Plan
from moec.plan.placement import place
from moec.plan.placement_problem import MEMORY_FIELD, PlacementError, make_problem
from moec.spec import Spec


def _routing(spec: Spec, plan: Plan, base_dir: Path | None) -> tuple[trace_mod.Trace, str]:
    """The routing trace the placement packs: the spec's, or uniform routing of one layer."""
    tokens = spec.workload.tokens_per_rank * plan.mesh.ep
    if spec.placement.trace is None:
        uniform = trace_mod.uniform_trace(plan.dims.experts, 1, tokens, plan.dims.top_k)
        return uniform, "uniform routing (no trace)"
    path = (base_dir or Path(".")) / spec.placement.trace
    try:
        loaded = trace_mod.load_trace(path, num_experts=plan.dims.experts)
    except trace_mod.TraceError as exc:
        raise FieldError("placement.trace", str(exc)) from None
    if len(loaded.layers) not in (1, len(plan.moe_layers)):
        raise PlacementError(
            "placement.trace",
            f"the trace has {len(loaded.layers)} layers; the spec has {len(plan.moe_layers)} MoE layers",
            "record one layer (used for all) or one per MoE layer",
        )
    return loaded, spec.placement.trace


def place_experts(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Expert → ep-rank tables for every MoE layer, by the spec's strategy and routing trace."""
    mesh = plan.mesh
    topology.check_experts_fit(plan.dims.experts, spec.placement.redundant, mesh.ep)
    routing, source = _routing(spec, plan, base_dir)
    node_G = tuple(rank // mesh.gpus_per_node for rank in mesh.ep_groups[0])
    layers_per_stage = max(1, -(-len(plan.moe_layers) // mesh.pp))
    gpu = gpu_profile(spec)
    problem = make_problem(
        routing,
        expert_shapes(plan),
        node_G,
        gpu=gpu,
        redundant=spec.placement.redundant,
        mem_cap_bytes=gpu.memory_gb
        * 1e9
        / layers_per_stage,  # the rank's memory, split over its layers
        train=spec.workload.mode == "train",
        top_k=plan.dims.top_k,
        grad_bytes=BYTES[spec.dtype],
    )
    try:
        placed = place(problem, spec.placement.strategy)
    except PlacementError as exc:
        if exc.path != MEMORY_FIELD or not isinstance(spec.cluster.gpu, str):
            raise
        # a named profile: the spec has no memory_gb to point at, only the GPU's name
        raise PlacementError(
            "cluster.gpu",
            f"{exc.message}; {spec.cluster.gpu}: {gpu.memory_gb:g} GB per GPU",
            exc.hint,
        ) from None
    layers = tuple(
        LayerPlacement(
            ranks=layer.ranks,
            shares=tuple(tuple(round(x, 6) for x in row) for row in layer.shares),
            load_us=tuple(round(x, 3) for x in layer.load_G),
            memory=tuple(int(x) for x in layer.memory_G),
            imbalance=round(layer.imbalance, 6),
        )
        for layer in placed.layers
    )
    if len(layers) == 1:  # one routing for every layer: the same tables
        layers = layers * len(plan.moe_layers)
    counts_E = np.asarray(routing.layers[0].counts_E, dtype=np.float64)
    probs = tuple(round(float(p), 9) for p in counts_E / max(counts_E.sum(), 1e-30))
    plan_placement = PlacementPlan(
        spec.placement.strategy, layers, source, round(max(0.0, placed.gap), 6), probs
    )
    return dataclasses.replace(plan, placement=plan_placement)


def plan_memory(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Per-rank bytes of the busiest rank: expert weights (+ training state), buffers, activations."""
    layers = max(1, -(-len(plan.moe_layers) // plan.mesh.pp))
    layer = plan.placement.layers[0]
    busiest = max(range(plan.mesh.ep), key=lambda g: layer.memory[g])
    shapes = expert_shapes(plan)
    held = layer.ranks[busiest]
    params = sum(shapes[e].params for e in held) / plan.mesh.expert_tp
    weights = sum(shapes[e].weight_bytes for e in held) / plan.mesh.expert_tp
    tokens = spec.workload.tokens_per_rank * plan.dims.slots
    widest = max(g.ffn for g in plan.groups) // plan.mesh.expert_tp
    breakdown = cost.rank_memory(
        weights,
        params,
        spec.workload.mode == "train",
        tokens,
        tokens,
        plan.dims.hidden,
        widest,
        glu=any(g.kind == "glu" for g in plan.groups),
        wire_bytes=BYTES[spec.comm.wire_dtype],
        act_bytes=BYTES[spec.dtype],
    )
    h = spec.hidden
    dense = plan.dims.router_outputs * h * 4 + 3 * h * plan.dims.shared_ffn * BYTES[spec.dtype]
    total = int(
        (breakdown.states - breakdown.buffers + dense) * layers
        + breakdown.buffers
        + breakdown.activations * layers
    )
    capacity = int(gpu_profile(spec).memory_gb * 1e9)
    memory = MemoryPlan(
        expert_weights=int(breakdown.weights) * layers,
        shared_and_router=int(dense) * layers,
        optimizer=int(breakdown.grads + breakdown.optimizer + breakdown.master) * layers,
        token_buffers=int(breakdown.buffers),
        activations=int(breakdown.activations) * layers,
        total=total,
        capacity=capacity,
        fits=total <= capacity,
    )
    return dataclasses.replace(plan, memory=memory)
