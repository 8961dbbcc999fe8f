"""Builders for the DeepSeek-V3 router family: sigmoid (or sqrt-softplus) scores, a selection-only
bias, optional group-limited routing, renormalisation with +1e-20 and a routed scaling factor.

The DeepSeek-V3 router forward is shared verbatim by many 5.23 blocks; they differ in config defaults,
key spellings, the masked value of group routing and the experts' GLU. ``V3_ARCHS`` lists those.

The V3 router computes its GEMM in fp32 (``F.linear(x.float(), W.float())``, the ``router.dtype``
default), as do Nemotron-H, Beam and Inkling-2; Mistral-4 and DeepSeek-V4 run it in the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.importers.hf_common import (
    all_layers,
    deepseek_balance,
    default_kw,
    group,
    mlp_types_layers,
    renorm,
    shared,
)
from moec.importers.hf_config import HFConfig

V3_EPS = 1e-20


@dataclass(frozen=True)
class V3Arch:
    block: str
    k: int | None  # config-class defaults; None = required
    n_group: int | None
    topk_group: int | None
    renorm: bool | None  # default of norm_topk_prob; None = always renormalised (no flag)
    scale: float
    n_shared: int | None  # 0 = no shared expert
    layers: str  # "dense_prefix" | "types" (mlp_layer_types, else a dense prefix) | "all"
    dense: int  # default first_k_dense_replace
    score: str = "sigmoid"
    masked: str = "-inf"  # what group routing writes into the experts of dropped groups
    bias: bool = True  # e_score_correction_bias for selection
    clamp: bool = False  # experts use silu(min(g, L)) * clamp(u, ±L) (F.silu hard-coded)
    shared_clamp: bool | None = None  # the same for the shared MLP (None: as the experts)
    aux: float | None = None  # default aux coefficient when transformers computes the std loss
    logits_dtype: str = "fp32"  # "input": the router GEMM and scores run in the input dtype
    shared_ffn: tuple[
        str, ...
    ] = ()  # keys of one shared expert's width; () = moe_intermediate_size
    shared_ffn_default: int | None = None
    layer_freq: bool = False  # MoE layers also need moe_layer_freq (an int, or one flag a layer)


V3_ARCHS = {
    "deepseek_v3": V3Arch("DeepseekV3MoE", 8, 8, 4, True, 2.5, 1, "dense_prefix", 3),
    "glm4_moe": V3Arch("Glm4MoeMoE", 8, 1, 1, True, 1.0, 1, "dense_prefix", 1),
    "dots1": V3Arch("Dots1MoE", None, 1, 1, False, 1.0, None, "dense_prefix", 0),
    "bailing_hybrid": V3Arch("BailingHybridMoE", 8, 8, 4, True, 2.5, 1, "types", 2),
    "glm4_moe_lite": V3Arch("Glm4MoeLiteMoE", 4, 1, 1, True, 1.8, 1, "types", 1),
    "kimi_linear": V3Arch("KimiLinearMoE", 8, 1, 1, True, 2.446, 1, "types", 1),
    "exaone_moe": V3Arch("ExaoneMoeSparseMoEBlock", 8, 1, 1, True, 2.5, 1, "types", 1),
    "solar_open": V3Arch("SolarOpenMoE", 8, 1, 1, True, 1.0, 1, "all", 0),
    "mimo_v2_flash": V3Arch("MiMoV2FlashMoE", 8, 1, 1, True, 1.0, 0, "types", 1),
    "glm5_next": V3Arch(
        "Glm5NextTextMoE", 8, 1, 1, True, 2.5, 1, "types", 3, clamp=True, aux=0.001
    ),
    # AXK2: groups masked with 0.0 (not -inf); n_group=None skips grouping
    "axk2": V3Arch("AXK2MoE", 8, None, None, True, 2.5, 1, "types", 1, masked="0", layer_freq=True),
    "glm4v_moe": V3Arch("Glm4vMoeTextMoE", 8, 1, 1, True, 1.0, 1, "dense_prefix", 1, aux=0.0001),
    "deepseek_v32": V3Arch("DeepseekV32MoE", 8, 8, 4, True, 2.5, 1, "types", 3),
    "glm_moe_dsa": V3Arch("GlmMoeDsaMoE", 8, 1, 1, True, 2.5, 1, "types", 3),
    # dots.3 note (text model): the shared experts have their own width
    "dots3_note": V3Arch(
        "Dots3NoteTextMoE",
        8,
        1,
        1,
        True,
        1.0,
        1,
        "types",
        1,
        shared_ffn=("shared_experts_intermediate_size", "moe_shared_expert_intermediate_size"),
        shared_ffn_default=1536,
        layer_freq=True,
    ),
    # HY-V4: clamped experts, plain shared MLP
    "hy_v4": V3Arch("HYV4MoE", 8, 1, 1, True, 2.827, 1, "types", 1, clamp=True, shared_clamp=False),
    # Mistral 4: softmax scores, no bias, groups masked with 0.0, logits in the input dtype
    "mistral4": V3Arch(
        "Mistral4MoE",
        4,
        1,
        1,
        True,
        1.0,
        1,
        "dense_prefix",
        0,
        "softmax",
        "0",
        False,
        logits_dtype="input",
    ),
    # Mistral Large 4: the same, but always renormalised and fp32 logits
    "mistral_large4": V3Arch(
        "MistralLarge4TextMoE", 4, 1, 1, None, 1.0, 1, "types", 1, "softmax", "0", False
    ),
}


def v3_family(c: HFConfig) -> dict:
    a = V3_ARCHS[c.model_type]
    ffn = c.int("moe_intermediate_size")
    e = c.int("n_routed_experts", "num_local_experts", "num_experts")
    router = {
        "score": a.score,
        "top_k": c.int("num_experts_per_tok", "num_experts_per_token", **default_kw(a.k)),
        "normalize": renorm(
            a.renorm is None or c.bool("norm_topk_prob", "moe_renormalize", default=a.renorm),
            V3_EPS,
        ),
        "scale": c.float("routed_scaling_factor", default=a.scale),
    }
    if a.bias:
        router["selection_bias"] = "scores"
    if a.logits_dtype == "input":
        router["dtype"] = "input"
    groups = c.get("n_group", "num_expert_group", default=a.n_group)
    keep = c.get("topk_group", default=a.topk_group)
    if groups is not None and int(groups) > 1 and int(keep) < int(groups):
        router["groups"] = {
            "count": int(groups),
            "keep": int(keep),
            "score": "top2_sum",
            "masked": a.masked,
        }
    n_shared = c.int("n_shared_experts", "num_shared_experts", **default_kw(a.n_shared))
    shared_ffn = c.int(*a.shared_ffn, **default_kw(a.shared_ffn_default)) if a.shared_ffn else ffn
    clamp = (
        {"glu": "clamp_then_act", "limit": c.float("swiglu_limit", default=10.0)} if a.clamp else {}
    )
    shared_clamp = clamp if a.shared_clamp is None else {}
    # GLM-5-Next / HY-V4 experts hard-code F.silu; their shared MLP follows hidden_act
    experts = group(c, ffn, e, act="silu" if a.clamp else None, **clamp)
    data = {
        "experts": experts,
        "shared": shared(c, shared_ffn * n_shared, **shared_clamp) if a.n_shared != 0 else None,
        "router": router,
        "balance": deepseek_balance(c),
        "layers": _v3_layers(c, a),
        "_block": a.block,
    }
    if a.aux is not None:
        data["balance"] = {"aux_loss": c.float("router_aux_loss_coef", default=a.aux)}
    return data


def _v3_layers(c: HFConfig, a: V3Arch) -> dict:
    count = c.int("num_hidden_layers")
    dense = c.int("first_k_dense_replace", default=a.dense)
    why = f"first_k_dense_replace={dense}"
    freq: int | list = 1
    if a.layer_freq:
        freq = c.get("moe_layer_freq", default=1)
        if not isinstance(freq, list):
            freq = c.int("moe_layer_freq", default=1)
        why += f", moe_layer_freq={freq}"

    def every_freq(i: int) -> bool:
        if isinstance(freq, list):
            return i < len(freq) and bool(freq[i])
        return i % int(freq) == 0

    def prefix() -> dict:
        return c.layers_where(count, lambda i: i >= dense and every_freq(i), why)

    if a.layers == "all":
        return all_layers(c, "num_hidden_layers")
    if a.layers == "types":
        return mlp_types_layers(c, prefix)
    return prefix()


def v3_like_router(c: HFConfig, default_k: int) -> dict:
    router = {
        "score": "sigmoid",
        "top_k": c.int("num_experts_per_tok", default=default_k),
        "selection_bias": "scores",
        "normalize": renorm(c.bool("norm_topk_prob", default=True), V3_EPS),
        "scale": c.float("routed_scaling_factor", default=1.0),
    }
    groups, keep = c.int("n_group", default=1), c.int("topk_group", default=1)
    if groups > 1 and keep < groups:
        router["groups"] = {"count": groups, "keep": keep, "score": "top2_sum", "masked": "-inf"}
    return router


def nemotron_h(c: HFConfig) -> dict:
    """Nemotron-H: the V3 router; non-gated ``down(relu2(up x))`` experts, optionally in a latent
    space (``fc1_latent_proj`` / ``fc2_latent_proj``); a non-gated shared MLP on x."""
    act = c.act("mlp_hidden_act", default="relu2")
    bias = c.bool("mlp_bias", default=False)
    data = v3_like_router(c, default_k=2)
    latent = c.get("moe_latent_size", default=None)
    types = c.get("layers_block_type", "layer_types", default=None)
    pattern = c.get("hybrid_override_pattern", default=None)
    if types is None and pattern is not None:
        moe = [i for i, ch in enumerate(pattern) if ch == "E"]
        count = len(pattern)
    else:
        types = types or ["linear_attention", "moe", "full_attention", "mlp"]
        moe = [i for i, t in enumerate(types) if t == "moe"]
        count = len(types)
    return {
        "experts": group(
            c, c.int("moe_intermediate_size"), c.int("n_routed_experts"), act=act, kind="mlp"
        ),
        "shared": shared(
            c, c.int("moe_shared_expert_intermediate_size"), act=act, kind="mlp", bias=bias
        ),
        "router": data,
        "latent": {"dim": int(latent), "bias": bias} if latent else None,
        "layers": c.layers(moe, count, "layers_block_type 'moe'"),
        "_block": "NemotronHMoE",
    }


def beam(c: HFConfig) -> dict:
    """Beam: the V3 router without scaling in the router; ``routed_scaling_factor`` multiplies the
    summed routed output; no shared expert; SwiGLU evaluated in fp32."""
    router = {
        "score": "sigmoid",
        "top_k": c.int("num_experts_per_tok", default=8),
        "selection_bias": "scores",
        "normalize": renorm(c.bool("norm_topk_prob", default=True), V3_EPS),
    }
    groups, keep = c.int("n_group", default=8), c.int("topk_group", default=4)
    if groups > 1 and keep < groups:
        router["groups"] = {"count": groups, "keep": keep, "score": "top2_sum", "masked": "-inf"}
    count = c.int("num_hidden_layers")
    dense = min(3, count)
    return {
        "experts": group(c, c.int("moe_intermediate_size"), c.int("num_experts")),
        "router": router,
        "routed_scale": c.float("routed_scaling_factor", default=2.5),
        "layers": mlp_types_layers(
            c, lambda: c.layers_where(count, lambda i: i >= dense, "3 dense layers")
        ),
        "_block": "BeamMoE",
    }


def _score_fn(c: HFConfig, default: str) -> str:
    fn = c.get("scoring_func", default=default)
    if fn not in ("sigmoid", "sqrtsoftplus"):
        raise c.refuse(f"scoring_func {fn!r} (moec knows sigmoid and sqrtsoftplus here)")
    return fn


def deepseek_v4(c: HFConfig) -> dict:
    """DeepSeek-V4 (learned-router layers): sqrt(softplus) scores + bias for selection, always
    renormalised (+1e-20), x routed_scaling_factor; clamped SwiGLU in the experts and the shared MLP.
    The ``hash_moe`` layers route by a static token-id table, which no spec can express."""
    ffn = c.int("moe_intermediate_size", "intermediate_size")
    clamp = {"glu": "clamp_then_act", "limit": c.float("swiglu_limit", default=10.0)}
    count = c.int("num_hidden_layers")
    types = c.get("mlp_layer_types", default=None)
    if types is None:
        n_hash = c.int("num_hash_layers", default=3)
        types = ["hash_moe"] * min(count, n_hash) + ["moe"] * max(0, count - n_hash)
    types = list(types)[:count]
    if c.layer is not None and c.layer < len(types) and types[c.layer] == "hash_moe":
        raise c.refuse(f"layer {c.layer} is a hash-routed layer (experts = tid2eid[input_ids])")
    moe = [i for i, t in enumerate(types) if t == "moe"]
    return {
        "experts": group(c, ffn, c.int("n_routed_experts", "num_local_experts"), **clamp),
        "shared": shared(c, ffn, bias=c.bool("mlp_bias", default=False), **clamp),
        "router": {
            "score": _score_fn(c, "sqrtsoftplus"),
            "top_k": c.int("num_experts_per_tok", default=6),
            "selection_bias": "scores",
            "normalize": renorm(True, V3_EPS),
            "scale": c.float("routed_scaling_factor", default=1.5),
            "dtype": "input",
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": c.layers(moe, count, "mlp_layer_types 'moe' (hash_moe layers excluded)"),
        "_block": "DeepseekV4SparseMoeBlock",
        "_note": "learned-router layers only; the first hash_moe layers are not described",
    }


def inkling2(c: HFConfig) -> dict:
    """Inkling-2: sigmoid + bias for selection, renorm (+1e-20), x route_scale; softcapped SwiGLU
    ``capg(g) * σ(g) * capu(u)``; no shared expert."""
    return {
        "experts": group(
            c,
            c.int("moe_intermediate_size", "intermediate_size"),
            c.int("n_routed_experts", "num_local_experts"),
            glu="softcap_sigmoid",
            gate_softcap=c.float("mlp_gate_softcap", default=4.0),
            up_softcap=c.float("mlp_up_softcap", default=25.0),
        ),
        "router": {
            "score": _score_fn(c, "sigmoid"),
            "top_k": c.int("num_experts_per_tok", default=8),
            "selection_bias": "scores",
            "normalize": renorm(True, V3_EPS),
            "scale": c.float("route_scale", "routed_scaling_factor", default=8.0),
        },
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "Inkling2SparseMoeBlock",
    }
