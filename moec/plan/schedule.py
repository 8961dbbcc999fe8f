"""The passes that predict one MoE layer's timeline: ``schedule_comm`` (the dispatch method and
the chunks the all-to-all pipelines through dispatch -> experts -> combine) and
``estimate_cost`` (the predicted phases and pipelined total on the busiest rank).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moec.plan import cost
from moec.plan.canonical import BYTES, expert_shapes, gpu_profile
from moec.plan.ir import CommPlan, CostPlan, Plan
from moec.spec import Spec

MAX_CHUNKS = 4  # past ~4 chunks the gain flattens while every chunk pays the latencies again
MIN_GAIN = 0.05  # pipelining must save 5% of the layer's predicted time to be chosen


def schedule_comm(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Predict flat, hierarchical and all-gather dispatch for the first MoE layer; pick one, and the
    chunks the all-to-all pipelines through dispatch → experts → combine."""
    mesh = plan.mesh
    if mesh.ep == 1:
        return dataclasses.replace(plan, comm=CommPlan("local", 1, spec.comm.wire_dtype, 0, {}))
    choice = _dispatch_choice(spec, plan)
    chosen = spec.comm.dispatch if spec.comm.dispatch != "auto" else _NAMES[choice.choice]
    stages, shared_us = layer_stages(spec, plan, chosen)
    chunks, notes = _chunks(spec, chosen, stages, shared_us)
    send_GG, _, _ = _traffic(spec, plan)
    sent = int(float(np.max(send_GG.sum(1) - np.diag(send_GG))))
    rounded = {name: round(us, 3) for name, us in _by_name(choice).items()}
    comm = CommPlan(chosen, chunks, spec.comm.wire_dtype, sent, rounded)
    return dataclasses.replace(plan, comm=comm, notes=plan.notes + tuple(notes))


def _chunks(spec: Spec, dispatch: str, stages, shared_us: float) -> tuple[int, list[str]]:
    """The chunk count: the spec's, or (auto) the best of 1..MAX_CHUNKS by the cost model when it
    saves at least MIN_GAIN; small messages stay whole since every chunk pays the latency again.
    The all-to-alls pipeline chunks (the hierarchical one its experts → combine only, see
    ``cost.moe_layer_us``); the all-gather does not."""
    asked = spec.comm.chunks
    if dispatch == "all_gather":
        if asked not in ("auto", 1):
            return 1, [f"comm.chunks: {asked} not used: the all-gather dispatch runs in one chunk"]
        return 1, []
    overlaps = dispatch != "hierarchical"

    def layer_us(chunks: int) -> float:
        return cost.moe_layer_us(stages, chunks, shared_us, overlaps)

    one = layer_us(1)
    if asked == "auto":
        chunks, best_us = min(
            ((c, layer_us(c)) for c in range(1, MAX_CHUNKS + 1)), key=lambda pair: pair[1]
        )
        chunks = chunks if best_us < (1.0 - MIN_GAIN) * one else 1
    else:
        chunks = asked
    if chunks == 1:
        return 1, []
    piped = "dispatch → experts → combine" if overlaps else "experts → combine (dispatch first)"
    return chunks, [
        f"{piped} pipelined in {chunks} chunks: {layer_us(chunks):.1f} µs predicted instead of "
        f"{one:.1f} µs in one"
    ]


def _dispatch_choice(spec: Spec, plan: Plan, share: float = 1.0) -> cost.DispatchChoice:
    """One-way dispatch of the first MoE layer by each method, on a ``share`` of the tokens."""
    gpu = gpu_profile(spec)
    send_GG, unique_GN, node_G = _traffic(spec, plan)
    tokens_bytes = spec.workload.tokens_per_rank * plan.dims.hidden * BYTES[spec.comm.wire_dtype]
    gather_G = np.full(plan.mesh.ep, tokens_bytes * share)
    return cost.choose_dispatch(
        send_GG * share, node_G, gpu.intra, gpu.inter, gather_G, unique_GN * share
    )


def _by_name(choice: cost.DispatchChoice) -> dict[str, float]:
    """µs per dispatch method, under the names of ``comm.dispatch``."""
    return {
        "all_to_all": choice.flat_us,
        "hierarchical": choice.hierarchical_us,
        "all_gather": choice.all_gather_us,
    }


def layer_stages(spec: Spec, plan: Plan, dispatch: str) -> tuple[list, float]:
    """The busiest rank's (dispatch, experts, combine) as ``(fixed_us, scaled_us)`` stages for
    :func:`cost.pipeline_us`, and the shared expert's µs (0 without one)."""
    gpu = gpu_profile(spec)
    comm = (0.0, 0.0)
    if dispatch != "local":  # from the time on all the tokens and on half of them
        full, half = (_by_name(_dispatch_choice(spec, plan, s))[dispatch] for s in (1.0, 0.5))
        comm = cost.linear_stage(full, half)
    experts = cost.linear_stage(
        max(plan_rank_compute(spec, plan, gpu)), max(plan_rank_compute(spec, plan, gpu, 0.5))
    )
    shared_us = 0.0
    if spec.shared is not None:
        shape = cost.ExpertShape(
            plan.dims.hidden, spec.shared.ffn, spec.shared.kind == "glu", spec.shared.dtype
        )
        shared_us = cost.expert_time_us(shape, spec.workload.tokens_per_rank, gpu)
    return [comm, experts, comm], shared_us


_NAMES = {"flat": "all_to_all", "hierarchical": "hierarchical", "all_gather": "all_gather"}


def _traffic(spec: Spec, plan: Plan):
    """Expected dispatch bytes between the ep ranks of the first MoE layer."""
    layer = plan.placement.layers[0]
    share_EG = np.zeros((plan.dims.experts, plan.mesh.ep))
    for g, (ids, shares) in enumerate(zip(layer.ranks, layer.shares, strict=True)):
        share_EG[list(ids), g] += shares
    node_G = np.asarray([rank // plan.mesh.gpus_per_node for rank in plan.mesh.ep_groups[0]])
    tokens_G = np.full(plan.mesh.ep, spec.workload.tokens_per_rank)
    per_token = plan.dims.hidden * BYTES[spec.comm.wire_dtype]
    probs_E = np.asarray(plan.placement.pick_probs)
    send_GG, unique_GN = cost.dispatch_traffic(
        share_EG, probs_E, tokens_G, plan.dims.top_k, per_token, node_G
    )
    return send_GG, unique_GN, node_G


def plan_rank_compute(
    spec: Spec, plan: Plan, gpu: cost.GpuProfile, share: float = 1.0
) -> list[float]:
    """Roofline µs of each ep rank's experts on its expected tokens (first MoE layer), or on a
    ``share`` of them (one chunk)."""
    shapes = expert_shapes(plan)
    probs_E = plan.placement.pick_probs
    # picks in the ep group
    slots = spec.workload.tokens_per_rank * plan.mesh.ep * plan.dims.top_k * share
    layer = plan.placement.layers[0]
    return [
        cost.rank_compute_us(
            [shapes[e] for e in ids],
            [slots * probs_E[e] * sh for e, sh in zip(ids, shares, strict=True)],
            gpu,
        )
        / plan.mesh.expert_tp
        for ids, shares in zip(layer.ranks, layer.shares, strict=True)
    ]


def estimate_cost(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Predicted phases of one MoE layer forward on the busiest rank, and the pipelined total."""
    stages, shared_us = layer_stages(spec, plan, plan.comm.dispatch)
    comm_us, experts_us = sum(stages[0]), sum(stages[1])
    phases = {"dispatch": comm_us, "experts": experts_us, "combine": comm_us}
    if spec.shared is not None:
        phases["shared (overlaps dispatch)"] = shared_us
    overlaps = plan.comm.dispatch != "hierarchical"  # see _chunks
    total = cost.moe_layer_us(stages, plan.comm.chunks, shared_us, overlaps)
    shapes = expert_shapes(plan)
    share = [g.count / plan.dims.experts for g in plan.groups]
    flops_tok = (
        sum(s * g.flops_per_token for s, g in zip(share, plan.groups, strict=True))
        * plan.dims.top_k
    )
    held = plan.placement.layers[0].ranks[0]
    weight_bytes = int(sum(shapes[e].weight_bytes for e in held))
    phases = {name: round(us, 3) for name, us in phases.items()}
    return dataclasses.replace(
        plan, cost=CostPlan(phases, round(total, 3), int(flops_tok), weight_bytes)
    )
