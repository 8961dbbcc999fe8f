"""The first pass, ``canonicalize``, and the views of the spec that later passes share.

``canonicalize`` derives dims, expert groups, the mesh and the MoE layer list, and notes semantic
equivalences. :func:`gpu_profile` (the spec's accelerator and links), :func:`expert_shapes` (one
roofline shape per expert) and ``BYTES`` (bytes per element of each dtype) feed the cost model in
the placement, memory, communication and cost passes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moec.plan import cost, topology
from moec.plan.ir import Dims, GroupPlan, Mesh, Plan
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


def gpu_profile(spec: Spec) -> cost.GpuProfile:
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


def expert_shapes(plan: Plan) -> tuple[cost.ExpertShape, ...]:
    """One roofline shape per global expert id."""
    return tuple(
        cost.ExpertShape(plan.dims.expert_in, g.ffn, g.kind == "glu", g.dtype)
        for g in plan.groups
        for _ in range(g.count)
    )
