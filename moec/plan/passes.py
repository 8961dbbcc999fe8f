"""The planner: a fixed, named list of pure passes, with an invariant check after each.

    canonicalize → place_experts → schedule_comm → plan_memory → choose_kernels → estimate_cost

Each pass takes the spec and the plan so far and returns a new plan; none touches the disk or mutates its
input. ``run_passes`` checks the invariants after every pass, so a broken pass fails at its own name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from moec.plan import cost, placement, topology
from moec.plan import trace as trace_mod
from moec.plan import tuning as tuning_mod
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
from moec.plan.placement import PlacementError
from moec.spec import Spec, spec_hash

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


def canonicalize(spec: Spec, _: Plan | None, base_dir: Path | None = None) -> Plan:
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
    m = topology.make_mesh(c.nodes, c.gpus_per_node, p.dp, p.tp, p.ep, p.pp, p.expert_tp)
    mesh = Mesh(
        m.world,
        m.nodes,
        m.gpus_per_node,
        m.dp,
        m.tp,
        m.ep,
        m.pp,
        m.expert_tp,
        edp=m.edp,
        ep_groups=m.groups("ep"),
        ep_spans_nodes=m.ep_spans_nodes,
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


def _gpu(spec: Spec) -> cost.GpuProfile:
    """The spec's accelerator, with the spec's link numbers where it gives them."""
    gpu = spec.cluster.gpu
    if isinstance(gpu, str):
        profile = cost.PROFILES[gpu]
    else:  # explicit numbers: links from the h100 profile unless the spec names them
        base = cost.PROFILES["h100"]
        tflops = {"bf16": gpu.tflops_bf16}
        profile = dataclasses.replace(
            base,
            name=gpu.name,
            tflops=tflops,
            hbm_tb_per_s=gpu.hbm_gbps / 1e3,
            memory_gb=gpu.memory_gb,
            source="spec",
        )
    links = spec.cluster.links
    if links.intra is not None:
        profile = dataclasses.replace(
            profile, intra=cost.Link(links.intra.latency_us, links.intra.gbps)
        )
    if links.inter is not None:
        profile = dataclasses.replace(
            profile, inter=cost.Link(links.inter.latency_us, links.inter.gbps)
        )
    return profile


def _shapes(plan: Plan) -> tuple[cost.ExpertShape, ...]:
    """One roofline shape per global expert id."""
    return tuple(
        cost.ExpertShape(plan.dims.expert_in, g.ffn, g.kind == "glu", g.dtype)
        for g in plan.groups
        for _ in range(g.count)
    )


def _routing(spec: Spec, plan: Plan, base_dir: Path | None) -> tuple[trace_mod.Trace, str]:
    """The routing trace the placement packs: the spec's, or uniform routing of one layer."""
    tokens = spec.workload.tokens_per_rank * plan.mesh.ep
    if spec.placement.trace is None:
        uniform = trace_mod.uniform_trace(plan.dims.experts, 1, tokens, plan.dims.top_k)
        return uniform, "uniform routing (no trace)"
    path = (base_dir or Path(".")) / spec.placement.trace
    loaded = trace_mod.load_trace(path, num_experts=plan.dims.experts)
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
    gpu = _gpu(spec)
    problem = placement.make_problem(
        routing,
        _shapes(plan),
        node_G,
        gpu=gpu,
        redundant=spec.placement.redundant,
        mem_cap_bytes=gpu.memory_gb
        * 1e9
        / layers_per_stage,  # the rank's memory, split over its layers
        train=spec.workload.mode == "train",
        top_k=plan.dims.top_k,
    )
    placed = placement.place(problem, spec.placement.strategy)
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


MAX_CHUNKS = 4  # past ~4 chunks the gain flattens while every chunk pays the latencies again
MIN_GAIN = 0.05  # pipelining must save 5% of the layer's predicted time to be chosen


def schedule_comm(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Predict flat, hierarchical and all-gather dispatch for the first MoE layer; pick one, and the
    chunks the flat all-to-all pipelines through dispatch → experts → combine."""
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
    saves at least MIN_GAIN; small messages stay whole since every chunk pays the latency again."""
    asked = spec.comm.chunks
    if dispatch != "all_to_all":
        if asked not in ("auto", 1):
            return 1, [f"comm.chunks: {asked} not used: only the flat all-to-all pipelines chunks"]
        return 1, []
    one = cost.moe_layer_us(stages, 1, shared_us)
    if asked == "auto":
        chunks, best_us = min(
            ((c, cost.moe_layer_us(stages, c, shared_us)) for c in range(1, MAX_CHUNKS + 1)),
            key=lambda pair: pair[1],
        )
        chunks = chunks if best_us < (1.0 - MIN_GAIN) * one else 1
    else:
        chunks = asked
    if chunks == 1:
        return 1, []
    pipelined = cost.moe_layer_us(stages, chunks, shared_us)
    return chunks, [
        f"dispatch → experts → combine pipelined in {chunks} chunks: {pipelined:.1f} µs predicted "
        f"instead of {one:.1f} µs in one"
    ]


def _dispatch_choice(spec: Spec, plan: Plan, share: float = 1.0) -> cost.DispatchChoice:
    """One-way dispatch of the first MoE layer by each method, on a ``share`` of the tokens."""
    gpu = _gpu(spec)
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
    gpu = _gpu(spec)
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
    shapes = _shapes(plan)
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


def plan_memory(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Per-rank bytes of the busiest rank: expert weights (+ training state), buffers, activations."""
    layers = max(1, -(-len(plan.moe_layers) // plan.mesh.pp))
    layer = plan.placement.layers[0]
    busiest = max(range(plan.mesh.ep), key=lambda g: layer.memory[g])
    shapes = _shapes(plan)
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
    capacity = int(_gpu(spec).memory_gb * 1e9)
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


def routing_kernel_covers(spec: Spec) -> bool:
    """Whether the fused routing kernel computes exactly this router's selection and weights.

    The kernel adds the selection bias to whatever it ranks (scores, or logits with topk_on
    logits); a bias on the logits while ranking scores, zero experts, and the non-top-k routers stay
    on the torch path.
    """
    r = spec.router
    bias_ok = r.selection_bias == "none" or (r.selection_bias == "scores") == (
        r.topk_on == "scores"
    )
    return r.kind == "token_choice" and spec.zero_experts == 0 and bias_ok


def choose_kernels(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Which parts run as Triton kernels on CUDA, and the tile tables from ``moec tune`` if given."""
    groups = tuple(g.name for g in plan.groups)  # every precision: float, int8, int4, fp8 tiles
    notes = []
    if not routing_kernel_covers(spec):
        notes.append("this router runs the torch path (the routing kernel does not cover it)")
    tuning, source = (), None
    if spec.kernels.tuning is not None:
        source = spec.kernels.tuning
        tuning = tuning_mod.load_tuning((base_dir or Path(".")) / source)
    plan_kernels = KernelPlan(routing_kernel_covers(spec), groups, source, tuning, tuple(notes))
    return dataclasses.replace(plan, kernels=plan_kernels)


def estimate_cost(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Predicted phases of one MoE layer forward on the busiest rank, and the pipelined total."""
    stages, shared_us = layer_stages(spec, plan, plan.comm.dispatch)
    comm_us, experts_us = sum(stages[0]), sum(stages[1])
    phases = {"dispatch": comm_us, "experts": experts_us, "combine": comm_us}
    if spec.shared is not None:
        phases["shared (overlaps dispatch)"] = shared_us
    total = cost.moe_layer_us(stages, plan.comm.chunks, shared_us)
    shapes = _shapes(plan)
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


Pass = Callable[[Spec, Plan | None, Path | None], Plan]
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
            slots = sum(len(ids) for ids in layer.ranks)
            need(
                slots == plan.dims.experts + spec.placement.redundant, "slots = experts + redundant"
            )
            share_E = [0.0] * plan.dims.experts
            for ids, shares in zip(layer.ranks, layer.shares, strict=True):
                for e, share in zip(ids, shares, strict=True):
                    share_E[e] += share
            need(
                all(abs(x - 1.0) < 1e-4 for x in share_E),
                "each expert's copies serve all its tokens",
            )
            need(
                all(len(set(ids)) == len(ids) for ids in layer.ranks),
                "no duplicate expert on a rank",
            )
    if plan.memory is not None:
        parts = plan.memory.token_buffers + plan.memory.activations
        need(plan.memory.total >= parts, "memory total covers its parts")
    if plan.cost is not None:
        need(all(us >= 0 for us in plan.cost.phases_us.values()), "phase times are non-negative")


def run_passes(
    spec: Spec, base_dir: Path | None = None, trace: Callable[[str, Plan], None] | None = None
) -> Plan:
    """Run every pass in order, checking invariants after each; ``trace`` sees each intermediate plan.

    ``base_dir`` is the spec file's folder: ``placement.trace`` is relative to it.
    """
    plan: Plan | None = None
    for step in PASSES:
        plan = step(spec, plan, base_dir)
        try:
            check_invariants(spec, plan)
        except PlanInvariantError as exc:
            raise PlanInvariantError(f"after pass {step.__name__}: {exc}") from None
        if trace is not None:
            trace(step.__name__, plan)
    return plan
