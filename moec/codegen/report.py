"""The plan for people: the same sections for PLAN.md (a template) and the terminal (rich tables)."""

from __future__ import annotations

from moec.plan.ir import Plan
from moec.spec import Spec


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def sections(spec: Spec, plan: Plan) -> list[dict]:
    """Report sections: each a title, column names and rows of strings."""
    d, mesh = plan.dims, plan.mesh
    out = [
        {
            "title": "Layer",
            "columns": ["quantity", "value"],
            "rows": [
                ["hidden (H)", str(d.hidden)],
                ["routed experts (E)", str(d.experts)],
                ["zero experts (Z)", str(d.zero_experts)],
                ["slots per token (K)", str(d.slots)],
                ["shared expert width", str(d.shared_ffn or "-")],
                ["MoE layers", f"{len(plan.moe_layers)} of {spec.layers.count}"],
                [
                    "FLOPs per token (routed, fwd)",
                    f"{plan.cost.flops_per_token:,}" if plan.cost else "-",
                ],
            ],
        },
        {
            "title": "Expert groups",
            "columns": ["group", "experts", "F", "MLP", "weights", "params/expert", "FLOPs/token"],
            "rows": [
                [
                    g.name,
                    f"{g.first}..{g.first + g.count - 1}",
                    str(g.ffn),
                    f"{g.kind} {g.glu if g.kind == 'glu' else ''} {g.activation}".replace(
                        "  ", " "
                    ),
                    g.dtype,
                    f"{g.params_per_expert:,}",
                    f"{g.flops_per_token:,}",
                ]
                for g in plan.groups
            ],
        },
        {
            "title": "Mesh",
            "columns": ["world", "nodes × GPUs", "dp", "tp", "ep", "pp", "expert tp"],
            "rows": [
                [
                    str(mesh.world),
                    f"{mesh.nodes} × {mesh.gpus_per_node} {spec.cluster.gpu if isinstance(spec.cluster.gpu, str) else spec.cluster.gpu.name}",
                    *map(str, (mesh.dp, mesh.tp, mesh.ep, mesh.pp, mesh.expert_tp)),
                ]
            ],
        },
    ]
    if plan.placement and plan.placement.layers:
        first = plan.placement.layers[0]
        per_rank = zip(first.ranks, first.load_us, first.memory, strict=True)
        rows = [
            [str(g), _ids(ids), f"{load:.1f}", human_bytes(mem)]
            for g, (ids, load, mem) in enumerate(per_rank)
        ]
        out.append(
            {
                "title": f"Placement ({plan.placement.strategy}, {plan.placement.source}; layer {plan.moe_layers[0]}: max/mean load {first.imbalance:.3f}, gap to bound {plan.placement.gap:.1%})",
                "columns": [
                    "ep rank",
                    "experts",
                    "expected expert µs",
                    (
                        "expert weights + grads, optimizer"
                        if spec.workload.mode == "train"
                        else "expert weights"
                    ),
                ],
                "rows": rows[:16]
                + ([["…", f"{len(rows) - 16} more ranks", "", ""]] if len(rows) > 16 else []),
            }
        )
    if plan.comm:
        c = plan.comm
        rows = [
            [name, f"{us:.1f}", "◀" if name == c.dispatch else ""]
            for name, us in sorted(c.predicted_us.items())
        ]
        out.append(
            {
                "title": f"Communication: {c.dispatch}, {c.chunks} chunk(s), {c.wire_dtype} on the wire, {human_bytes(c.bytes_per_rank)} sent per rank per dispatch",
                "columns": ["schedule", "predicted µs", "chosen"],
                "rows": rows or [["local (no communication)", "0.0", "◀"]],
            }
        )
    if plan.memory:
        m = plan.memory
        rows = [
            ["expert weights", human_bytes(m.expert_weights)],
            ["shared + router weights", human_bytes(m.shared_and_router)],
            ["optimizer state", human_bytes(m.optimizer)],
            ["token buffers", human_bytes(m.token_buffers)],
            ["activations", human_bytes(m.activations)],
            [
                "total",
                f"{human_bytes(m.total)} of {human_bytes(m.capacity)} ({'fits' if m.fits else 'DOES NOT FIT'})",
            ],
        ]
        out.append(
            {
                "title": "Memory per rank (MoE layers of one stage)",
                "columns": ["what", "bytes"],
                "rows": rows,
            }
        )
    if plan.kernels:
        out.append(_kernels(plan))
    if plan.cost:
        rows = [[phase, f"{us:.1f}"] for phase, us in plan.cost.phases_us.items()]
        rows.append(["total", f"{plan.cost.total_us:.1f}"])
        title = (
            f"Predicted time per MoE layer forward, {spec.workload.tokens_per_rank} tokens per rank"
        )
        out.append({"title": title, "columns": ["phase", "µs"], "rows": rows})
    notes = plan.notes + (plan.kernels.notes if plan.kernels else ())
    if notes:
        out.append({"title": "Notes", "columns": ["note"], "rows": [[n] for n in notes]})
    return out


def _kernels(plan: Plan) -> dict:
    """The Triton backend's expert-kernel calls per rank, and where their tiles come from."""
    k = plan.kernels
    tuned = {shape for shape, _ in k.tuning}
    rows = [
        [
            name,
            *map(str, (H, F, E, K)),
            weights,
            "tuned" if (H, F, E, K, weights) in tuned else "heuristic",
        ]
        for name, H, F, E, K, weights in k.shapes
    ]
    source = (
        f"tiles from {k.tuning_source}"
        if k.tuning_source
        else "heuristic tiles (no kernels.tuning)"
    )
    routing = "fused routing kernel" if k.routing_kernel else "torch routing"
    return {
        "title": f"Kernels on CUDA: {routing}, {source}",
        "columns": ["group", "H", "F per rank", "E per rank", "K", "weights", "tiles"],
        "rows": rows,
    }


def _ids(ids: tuple[int, ...]) -> str:
    if len(ids) > 2 and list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}..{ids[-1]}"
    text = ", ".join(map(str, ids[:12]))
    return text + (f", … ({len(ids)})" if len(ids) > 12 else "")


def plan_markdown(spec: Spec, plan: Plan, origin) -> str:
    from moec.codegen.render import environment

    context = {"name": spec.name, "origin": origin, "plan": plan, "sections": sections(spec, plan)}
    return environment().get_template("PLAN.md.jinja").render(**context)
