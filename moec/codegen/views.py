"""Plan → flat template contexts. Every naming and every choice the templates need is made here.

Templates receive plain values (names, numbers already formatted as Python literals, booleans) and
only loop and branch on them. Untrusted text from the spec reaches generated code only as a checked
identifier (names) or through ``repr()``.
"""

from __future__ import annotations

import pprint

from moec import __version__
from moec.codegen.checkpoint import checkpoint_table
from moec.plan.ir import GroupPlan, Plan
from moec.spec.schema import MLP, Spec

TORCH_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
QUANTIZED = {"int8": "torch.int8", "int4": "torch.uint8", "fp8": "torch.float8_e4m3fn"}
GLU_NAMES = {
    ("standard", "silu"): "SwiGLU",
    ("standard", "gelu"): "GeGLU",
    ("standard", "gelu_tanh"): "GeGLU (tanh)",
    ("standard", "relu"): "ReGLU",
    ("gpt_oss", "silu"): "gpt-oss clamped GLU",
}


def lit(value: float | int) -> str:
    """A number as a Python literal that round-trips exactly."""
    return repr(float(value)) if isinstance(value, float) else repr(value)


def class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) + "Experts"


def describe_mlp(mlp: MLP) -> str:
    if mlp.kind == "mlp":
        return f"{mlp.activation} MLP"
    return GLU_NAMES.get((mlp.glu, mlp.activation), f"{mlp.glu} GLU with {mlp.activation}")


def mlp_view(mlp: MLP) -> dict:
    """What the glu_body macro needs."""
    return {
        "glu": mlp.kind == "glu",
        "glu_form": mlp.glu,
        "activation": mlp.activation,
        "limit": lit(mlp.limit) if mlp.limit is not None else None,
        "alpha": lit(mlp.alpha) if mlp.alpha is not None else None,
        "gate_softcap": lit(mlp.gate_softcap) if mlp.gate_softcap is not None else None,
        "up_softcap": lit(mlp.up_softcap) if mlp.up_softcap is not None else None,
        "bias": mlp.bias,
        "description": describe_mlp(mlp),
    }


def group_view(g: GroupPlan, mlp: MLP, h: int, sharded: bool, layer_dtype: str) -> dict:
    """A group's weights are allocated for ``n`` held experts of width ``f`` (the whole group's
    COUNT and FFN unless the layer is sharded); shapes are Python expressions over n and f.

    A float group whose dtype is not the layer's keeps its weights in that dtype (``stored``) and
    computes in the layer's, as the quantised groups do."""
    glu = g.kind == "glu"
    quantized = g.dtype in QUANTIZED
    stored = TORCH_DTYPES[g.dtype] if not quantized and g.dtype != layer_dtype else None
    int4 = g.dtype == "int4"
    rows = "2 * f" if glu else "f"
    first = {
        "name": "w_gate_up_E2FH" if glu else "w_up_EFH",
        "shape": f"(n, {rows}, {h})",
        "packed_shape": f"(n, {rows}, {h // 2 if int4 else h})",
        "scale_shape": f"(n, {rows})",
        "fan_in": h,
        "role": "gate and up (stacked)" if glu else "up",
        "one_shape": f"[{rows}, {h}]",
    }
    down = {
        "name": "w_down_EHF",
        "shape": f"(n, {h}, f)",
        "packed_shape": f"(n, {h}, f // 2)" if int4 else f"(n, {h}, f)",
        "scale_shape": f"(n, {h})",
        "fan_in": g.ffn,
        "role": "down",
        "one_shape": f"[{h}, f]",
    }
    weights = [first, down]
    for w in weights:
        w["dense_shape"] = w["shape"]
    biases = []
    if g.bias:
        biases = [
            {"name": "b_gate_up_E2F" if glu else "b_up_EF", "shape": f"(n, {rows})"},
            {"name": "b_down_EH", "shape": f"(n, {h})"},
        ]
    names = (["w_gate_EFH"] if glu else []) + ["w_up_EFH", "w_down_EHF"]
    if g.bias:
        names += (["b_gate_EF"] if glu else []) + ["b_up_EF", "b_down_EH"]
    # load_full's arguments, and the canonical checkpoint tensor each comes from
    full = [
        {"name": n, "optional": n.startswith("b_"), "canonical": n.rsplit("_", 1)[0]} for n in names
    ]
    return {
        **mlp_view(mlp),
        "name": g.name,
        "cls": class_name(g.name),
        "first": g.first,
        "last": g.first + g.count - 1,
        "count": g.count,
        "ffn": g.ffn,
        "dtype": g.dtype,
        "quantized": quantized,
        "qdtype": QUANTIZED.get(g.dtype),
        "stored": stored,
        "storage": g.dtype if quantized or stored else "float",
        "weights": weights,
        "biases": biases,
        "full": full,
        "sharded": sharded,
    }


def shared_view(spec: Spec) -> dict | None:
    s, h = spec.shared, spec.hidden
    if s is None:
        return None
    glu = s.kind == "glu"
    weights = [
        {
            "name": "w_gate_up_2FH" if glu else "w_up_FH",
            "shape": f"({2 * s.ffn if glu else s.ffn}, {h})",
            "fan_in": h,
        },
        {"name": "w_down_HF", "shape": f"({h}, {s.ffn})", "fan_in": s.ffn},
    ]
    biases = []
    if s.bias:
        biases = [
            {
                "name": "b_gate_up_2F" if glu else "b_up_F",
                "shape": f"({2 * s.ffn if glu else s.ffn},)",
            },
            {"name": "b_down_H", "shape": f"({h},)"},
        ]
    return {
        **mlp_view(s),
        "ffn": s.ffn,
        "weights": weights,
        "biases": biases,
        "gated": s.gate == "sigmoid_linear",
        "average": s.combine == "average",
    }


def router_view(spec: Spec, plan: Plan) -> dict:
    r, cap, bal = spec.router, spec.capacity, spec.balance
    g = r.groups
    norm = r.normalize
    loss_terms = []
    if bal.aux_loss:
        loss_terms.append(("load_balance", lit(bal.aux_loss)))
    if bal.seq_aux_loss:
        loss_terms.append(("seq_load_balance", lit(bal.seq_aux_loss)))
    if bal.z_loss:
        loss_terms.append(("z", lit(bal.z_loss)))
    has_capacity = cap.factor is not None or cap.tokens is not None
    return {
        "summary": router_summary(spec),
        "outputs": plan.dims.router_outputs,
        "experts": plan.dims.experts,
        "zero_experts": plan.dims.zero_experts,
        # TOP_K: the k token choice selects and the standard aux loss counts. Sparsemixer selects
        # two experts by construction, so there it is the loss's k alone (PhiMoE's HF loss counts
        # num_experts_per_tok slots).
        "top_k": bal.aux_loss_top_k or r.top_k,
        "slots": plan.dims.slots,
        "fp32": r.dtype == "fp32",
        "param_dtype": "torch.float32" if r.dtype == "fp32" else "dtype",
        "linear_bias": r.linear_bias,
        "softcap": lit(r.softcap) if r.softcap else None,
        "logit_multiplier": lit(r.logit_multiplier) if r.logit_multiplier != 1.0 else None,
        "is_token_choice": r.kind == "token_choice",
        "is_expert_choice": r.kind == "expert_choice",
        "is_switch": r.kind == "switch",
        "is_sparsemixer": r.kind == "sparsemixer",
        "sparsemixer_eps": lit(r.sparsemixer_eps) if r.sparsemixer_eps else None,
        "score": r.score,
        "score_over_k": r.topk_on == "logits",
        "topk_on_logits": r.topk_on == "logits",
        "selection_bias": r.selection_bias != "none",
        "bias_on": r.selection_bias,
        "bias_on_scores": r.selection_bias == "scores",
        "bias_on_logits": r.selection_bias == "logits",
        "groups": g is not None,
        "groups_count": g.count if g else 0,
        "groups_keep": g.keep if g else 0,
        "group_top2": g is not None and g.score == "top2_sum",
        "group_score_desc": (
            ("the sum of their top-2 scores" if g.score == "top2_sum" else "their best score")
            if g
            else ""
        ),
        "masked_value": ('float("-inf")' if g.masked == "-inf" else "0.0") if g else None,
        "weights_from_masked": g is not None and g.weights_from == "masked",
        "norm_sum": norm.kind == "sum",
        "norm_pnorm": norm.kind == "pnorm",
        "norm_eps": lit(norm.eps) if norm.eps else None,
        "norm_clamp_min": lit(norm.clamp_min) if norm.clamp_min else None,
        "norm_p": lit(norm.p) if norm.p else None,
        "scale": lit(r.scale) if r.scale != 1.0 else None,
        "has_capacity": has_capacity,
        "needs_math": (has_capacity or r.kind == "expert_choice") and cap.tokens is None,
        "capacity_tokens": cap.tokens,
        "capacity_factor": lit(cap.factor) if cap.factor else None,
        "capacity_scope": cap.scope,
        "per_sequence": cap.scope == "sequence",
        "drop_probs": cap.drop == "probs",
        "capacity_priority": (
            "highest weight first"
            if cap.drop == "probs"
            else "first choices first, then token order"
        ),
        "aux_standard": bool(bal.aux_loss) and bal.aux_loss_type == "standard",
        "aux_switch": bool(bal.aux_loss) and bal.aux_loss_type == "switch",
        "seq_aux": bool(bal.seq_aux_loss),
        "z_loss": bool(bal.z_loss),
        "any_loss": bool(loss_terms),
        "loss_terms": loss_terms,
        "bias_update_rate": lit(bal.bias_update_rate) if bal.bias_update_rate else None,
    }


def router_summary(spec: Spec) -> str:
    r = spec.router
    if r.kind == "switch":
        return "softmax, top-1 (switch) with capacity"
    if r.kind == "sparsemixer":
        return "sparsemixer top-2"
    if r.kind == "expert_choice":
        return f"{r.score}, expert choice"
    parts = [
        (
            f"{r.score} over the top-{r.top_k} logits"
            if r.topk_on == "logits"
            else f"{r.score} → top-{r.top_k}"
        )
    ]
    if r.selection_bias != "none":
        parts.append(f"selection bias on the {r.selection_bias}")
    if r.groups:
        parts.append(f"{r.groups.keep} of {r.groups.count} groups")
    if r.normalize.kind != "none":
        parts.append(f"{r.normalize.kind} renormalised")
    if r.scale != 1.0:
        parts.append(f"× {r.scale}")
    return ", ".join(parts)


def layer_view(spec: Spec, plan: Plan, groups: list[dict], shared: dict | None) -> dict:
    routed = "Σ_k w_k · E_k(x)" if spec.weight_on == "output" else "Σ_k E_k(w_k · x)"
    if spec.latent:
        routed = f"W_out · {routed.replace('x)', 'W_in x)')}"
    if spec.routed_scale != 1.0:
        routed = f"{spec.routed_scale} · {routed}"
    formula = routed + (" + b" if spec.output_bias else "")
    if shared:
        term = "σ(g·x) · S(x)" if shared["gated"] else "S(x)"
        formula = f"({formula} + {term}) / 2" if shared["average"] else f"{formula} + {term}"
    return {
        "hidden": spec.hidden,
        "slots": plan.dims.slots,
        "torch_dtype": TORCH_DTYPES[spec.dtype],
        "formula": formula,
        "routed_formula": routed,
        "latent": {"dim": spec.latent.dim, "bias": spec.latent.bias} if spec.latent else None,
        "output_bias": spec.output_bias,
        "routed_scale": lit(spec.routed_scale) if spec.routed_scale != 1.0 else None,
        "zero_experts": spec.zero_experts,
        "zero_first": plan.dims.experts,
        "zero_last": plan.dims.experts + spec.zero_experts - 1,
    }


def summary(spec: Spec, plan: Plan) -> str:
    groups = " + ".join(f"{g.count}×{describe_mlp(g)} F={g.ffn} {g.dtype}" for g in spec.experts)
    shared = f", shared F={spec.shared.ffn}" if spec.shared else ""
    return f"H={spec.hidden}, {groups}{shared}, {router_summary(spec)}"


def weights_view(spec: Spec, plan: Plan) -> dict:
    table = checkpoint_table(spec)
    g0 = spec.experts[0]
    required = ["router.weight"]
    optional = []
    if spec.router.linear_bias:
        required.append("router.bias")
    if spec.router.selection_bias != "none":
        optional.append("router.selection_bias")  # zero-initialised buffers may be absent
    names = ["w_gate", "w_up", "w_down"] if g0.kind == "glu" else ["w_up", "w_down"]
    required += [f"experts.{n}" for n in names]
    if any(g.bias for g in spec.experts):
        required += [f"experts.{n.replace('w_', 'b_')}" for n in names]
    if spec.latent:
        required += ["latent.w_in", "latent.w_out"] + (
            ["latent.b_in", "latent.b_out"] if spec.latent.bias else []
        )
    if spec.output_bias:
        required.append("output_bias")
    s = spec.shared
    if s:
        snames = ["w_gate", "w_up", "w_down"] if s.kind == "glu" else ["w_up", "w_down"]
        required += [f"shared.{n}" for n in snames]
        if s.bias:
            required += [f"shared.{n.replace('w_', 'b_')}" for n in snames]
        if s.gate:
            required.append("shared.score_gate")
    used = {name: table[name] for name in required + optional}
    return {
        "layout": spec.checkpoint.layout,
        "experts": plan.dims.experts,
        "sources": pprint.pformat(used, width=100, sort_dicts=True),
        "required": repr(required),
        "optional": repr(optional),
        "has": {
            "router_bias": spec.router.linear_bias,
            "selection_bias": spec.router.selection_bias != "none",
            "latent": spec.latent is not None,
            "latent_bias": bool(spec.latent and spec.latent.bias),
            "output_bias": spec.output_bias,
            "shared": s is not None,
            "shared_glu": bool(s and s.kind == "glu"),
            "shared_bias": bool(s and s.bias),
            "shared_gate": bool(s and s.gate),
        },
    }


def kernels_view(spec: Spec, plan: Plan) -> dict:
    """Arguments of the Triton kernels for this spec, as literals; the tuned tile tables."""
    r, g = spec.router, spec.router.groups
    norm = r.normalize
    routing_args = {
        "score": r.score,
        "topk_on": r.topk_on,
        "n_group": g.count if g else 1,
        "topk_group": g.keep if g else 1,
        "group_score": g.score if g else "top2_sum",
        "group_masked_value": g.masked if g else "-inf",
        "weights_from_masked": bool(g and g.weights_from == "masked"),
        "norm": norm.kind,
        "norm_eps": norm.eps,
        "norm_clamp_min": norm.clamp_min or 0.0,
        "norm_p": norm.p or 1.0,
        "scale": r.scale,
    }
    k = plan.kernels
    tables = {shape: dict(buckets) for shape, buckets in k.tuning}
    return {
        "routing_kernel": k.routing_kernel,
        "routing_args": [(name, repr(value)) for name, value in routing_args.items()],
        "tuning_source": k.tuning_source,
        "tuning_table": pprint.pformat(tables, width=100, sort_dicts=True),
    }


def expert_kernel_args(mlp: MLP) -> list[tuple[str, str]]:
    """Keyword arguments of kernels.moe_experts for one group's MLP form."""
    args = {
        "activation": mlp.activation,
        "glu_form": mlp.glu if mlp.kind == "glu" else "none",
    }
    if mlp.limit is not None:
        args["limit"] = mlp.limit
    if mlp.alpha is not None:
        args["alpha"] = mlp.alpha
    if mlp.gate_softcap is not None:
        args["gate_softcap"], args["up_softcap"] = mlp.gate_softcap, mlp.up_softcap
    return [(name, repr(value)) for name, value in args.items()]


def comm_view(plan: Plan) -> dict:
    """The mesh for comm.py (the placement tables it reads from plan.json) and its chunk count."""
    keys = ("nodes", "gpus_per_node", "dp", "tp", "ep", "pp", "expert_tp", "edp")
    chunks = plan.comm.chunks if plan.comm else 1
    return {"mesh": {k: getattr(plan.mesh, k) for k in keys}, "chunks": chunks}


def package_context(spec: Spec, plan: Plan) -> dict:
    """The context shared by every template of the package (each file adds its own ``file``)."""
    expert_in = plan.dims.expert_in
    sharded = plan.mesh.expert_tp > 1
    groups = [
        group_view(g, m, expert_in, sharded, spec.dtype)
        for g, m in zip(plan.groups, spec.experts, strict=True)
    ]
    for group, mlp in zip(groups, spec.experts, strict=True):
        group["kernel"] = group["name"] in plan.kernels.expert_kernel_groups
        group["kernel_args"] = expert_kernel_args(mlp)
    shared = shared_view(spec)
    router = router_view(spec, plan)
    distributed = plan.mesh.ep * plan.mesh.expert_tp > 1
    return {
        "name": spec.name,
        "version": __version__,
        "summary": summary(spec, plan),
        "groups": groups,
        "shared": shared,
        "r": router,
        "any_loss": router["any_loss"],
        "any_quantized": any(g["quantized"] for g in groups),
        "any_stored": any(g["stored"] for g in groups),
        "weight_on_input": spec.weight_on == "input",
        "expert_in": expert_in,
        "distributed": distributed,
        # sharded layers compute the shared expert while the routed rows are on the wire
        "overlap_shared": distributed and shared is not None,
        "shared_inline": shared is not None and not distributed,
        "sharded": sharded,
        "expert_tp": plan.mesh.expert_tp,
        "world": plan.mesh.world,
        "dispatch": plan.comm.dispatch if plan.comm else "local",
        # routed rows travel in the activations' dtype unless the spec asks for another
        "wire_dtype": (
            TORCH_DTYPES[spec.comm.wire_dtype] if spec.comm.wire_dtype != spec.dtype else None
        ),
        **layer_view(spec, plan, groups, shared),
        **weights_view(spec, plan),
        **kernels_view(spec, plan),
        **comm_view(plan),
    }
