"""Builders for sigmoid routers with a selection bias but no groups (MiniMax-M2/M3, Step-3.7, AFMoE,
HunYuan-V3, Laguna, LFM2, Kolibri, Flint) and LongCat-Flash's zero experts.

MiniMax-M2/M3, Step-3.7, AFMoE, Laguna and LFM2 compute the router GEMM in the input dtype
(``router.dtype: input``); HunYuan-V3, Kolibri, Flint and LongCat upcast to fp32 (the default).
"""

from __future__ import annotations

from moec.importers.hf_common import (
    all_layers,
    dense_first,
    group,
    mlp_types_layers,
    qwen_layers,
    renorm,
    shared,
)
from moec.importers.hf_config import HFConfig
from moec.importers.hf_sigmoid import V3_EPS


def minimax_m2(c: HFConfig) -> dict:
    """MiniMax-M2: sigmoid (fp32) + the block's ``e_score_correction_bias`` for selection, always
    renormalised (no eps), no scaling, no shared expert."""
    return {
        "experts": group(c, c.int("intermediate_size"), c.int("num_local_experts", "num_experts")),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=8),
            "selection_bias": "scores",
            "normalize": renorm(True),
            "dtype": "input",  # F.linear(x.to(W.dtype), W); only the sigmoid runs in fp32
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"bias_key": "e_score_correction_bias"},
        "_block": "MiniMaxM2SparseMoeBlock",
    }


def minimax_m3_vl(c: HFConfig) -> dict:
    """MiniMax-M3: the M2 router; experts and the shared DenseMLP use the gpt-oss GLU with
    non-interleaved halves and no bias; the routed sum x routed_scaling_factor."""
    glu = {
        "glu": "gpt_oss",
        "limit": c.float("swiglu_limit", default=7.0),
        "alpha": c.float("swiglu_alpha", default=1.702),
    }
    count = c.int("num_hidden_layers")
    return {
        "experts": group(
            c, c.int("intermediate_size"), c.int("num_local_experts", "num_experts"), **glu
        ),
        "shared": shared(c, c.int("shared_intermediate_size", default=3072), **glu),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=4),
            "selection_bias": "scores",
            "normalize": renorm(True),
            "dtype": "input",
        },
        "routed_scale": c.float("routed_scaling_factor", default=2.0),
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": mlp_types_layers(c, lambda: c.layers(list(range(count)), count, "all layers")),
        "_block": "MiniMaxM3VLSparseMoeBlock",
    }


def step3p7(c: HFConfig) -> dict:
    """Step-3.7: the M2 router; experts ``min(act(g), L) * clamp(u, ±L)`` (clamp *after* the
    activation) with per-layer limits (0/None = no clamp); shared MLP with its own per-layer limit;
    the routed sum x moe_router_scaling_factor. ``num_local_experts`` means ``n_routed_experts``."""
    limit = c.get("swiglu_limits", default=None, per_layer=True)
    shared_limit = c.get("swiglu_limits_shared", default=None, per_layer=True)
    clamp = {"glu": "act_then_clamp", "limit": float(limit)} if limit else {}
    shared_clamp = {"glu": "act_then_clamp", "limit": float(shared_limit)} if shared_limit else {}
    count = c.int("num_hidden_layers")
    enum = c.get("moe_layers_enum", default=None)
    if isinstance(enum, str):
        enum = [int(i) for i in enum.split(",") if i.strip()]
    moe = sorted(enum) if enum is not None else list(range(3, count))
    return {
        "experts": group(
            c, c.int("moe_intermediate_size"), c.int("n_routed_experts", "moe_num_experts"), **clamp
        ),
        "shared": shared(
            c,
            c.int("share_expert_dim", "share_expert_dims", default=1280),
            bias=c.bool("mlp_bias", default=False),
            **shared_clamp,
        ),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", "moe_top_k", default=8),
            "selection_bias": "scores",
            "normalize": renorm(True),
            "dtype": "input",
        },
        "routed_scale": c.float("moe_router_scaling_factor", default=1.0),
        "layers": mlp_types_layers(c, lambda: c.layers(moe, count, "moe_layers_enum")),
        "_block": "Step3p7SparseMoeBlock",
    }


def afmoe(c: HFConfig) -> dict:
    """AFMoE: sigmoid + the block's ``expert_bias`` for selection, renorm (+1e-20), x route_scale."""
    ffn = c.int("moe_intermediate_size")
    return {
        "experts": group(c, ffn, c.int("num_experts")),
        "shared": shared(c, ffn * c.int("num_shared_experts", default=2)),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=6),
            "selection_bias": "scores",
            "normalize": renorm(True, V3_EPS),
            "scale": c.float("route_scale", default=1.0),
            "dtype": "input",  # self.gate(x).to(float32): the GEMM in the input dtype
        },
        "layers": dense_first(c, "num_dense_layers", 1),
        "checkpoint": {"router_key": "router.gate", "bias_key": "expert_bias"},
        "_block": "AfmoeSparseMoeBlock",
    }


def hy_v3(c: HFConfig) -> dict:
    """HunYuan-V3: sigmoid + the block's bias for selection, renorm (+1e-20), x router_scaling_factor,
    ungated shared MLP of width moe_intermediate_size * num_shared_experts."""
    ffn = c.int("moe_intermediate_size")
    n_shared = c.int("num_shared_experts", default=1)
    return {
        "experts": group(c, ffn, c.int("num_experts", "num_local_experts")),
        "shared": shared(c, ffn * n_shared, bias=c.bool("mlp_bias", default=False)),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=8),
            "selection_bias": "scores",
            "normalize": renorm(True, V3_EPS),
            "scale": c.float("router_scaling_factor", default=2.826),
        },
        "layers": mlp_types_layers(c, lambda: dense_first(c, "first_k_dense_replace", 1)),
        "checkpoint": {"bias_key": "e_score_correction_bias"},
        "_block": "HYV3MoE",
    }


def laguna(c: HFConfig) -> dict:
    """Laguna: optional tanh softcap on the logits, sigmoid + bias, always renormalised, the routed
    sum x moe_routed_scaling_factor; ungated shared MLP."""
    if c.bool("moe_apply_router_weight_on_input", default=False):
        raise c.refuse(
            "moe_apply_router_weight_on_input=True (transformers does not implement it either)"
        )
    cap = c.float("moe_router_logit_softcapping", default=0.0)
    router = {
        "score": "sigmoid",
        "top_k": c.int("num_experts_per_tok", default=8),
        "selection_bias": "scores",
        "normalize": renorm(True),
        "dtype": "input",  # F.linear(x, W).float(): the GEMM in the input dtype
    }
    if cap > 0:
        router["softcap"] = cap
    return {
        "experts": group(c, c.int("moe_intermediate_size"), c.int("num_experts")),
        "shared": shared(c, c.int("shared_expert_intermediate_size", default=512)),
        "router": router,
        "routed_scale": c.float("moe_routed_scaling_factor", default=1.0),
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": mlp_types_layers(c, lambda: dense_first(c, "first_k_dense_replace", 1)),
        "_block": "LagunaSparseMoeBlock",
    }


def lfm2_moe(c: HFConfig) -> dict:
    """LFM2-MoE: sigmoid, optional ``expert_bias`` (block buffer) for selection, renorm with +1e-6
    (flag), x routed_scaling_factor. The experts hard-code SiLU whatever ``hidden_act`` says."""
    router = {
        "score": "sigmoid",
        "top_k": c.int("num_experts_per_tok", default=4),
        "normalize": renorm(c.bool("norm_topk_prob", default=True), 1e-6),
        "scale": c.float("routed_scaling_factor", default=1.0),
        "dtype": "input",
    }
    if c.bool("use_expert_bias", default=True):
        router["selection_bias"] = "scores"
    return {
        "experts": group(c, c.int("moe_intermediate_size"), c.int("num_experts"), act="silu"),
        "router": router,
        "layers": dense_first(c, "num_dense_layers", 2),
        "checkpoint": {"bias_key": "expert_bias"},
        "_block": "Lfm2MoeSparseMoeBlock",
    }


def kolibri1(c: HFConfig) -> dict:
    """Kolibri-1: the bias is added to the *logits* (pre-sigmoid) for selection; weights are the
    sigmoid of the selected logits; flag renorm (no eps); ungated shared MLP."""
    return {
        "experts": group(
            c, c.int("moe_intermediate_size"), c.int("num_experts", "num_local_experts")
        ),
        "shared": shared(c, c.int("shared_expert_intermediate_size", default=512)),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=6),
            "selection_bias": "logits",
            "normalize": renorm(c.bool("norm_topk_prob", default=False)),
        },
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "Kolibri1SparseMoeBlock",
    }


def flint(c: HFConfig) -> dict:
    """Flint: sigmoid -> top-k (no bias), flag renorm (no eps); ungated shared expert."""
    return {
        "experts": group(c, c.int("moe_intermediate_size"), c.int("num_experts")),
        "shared": shared(c, c.int("shared_expert_intermediate_size", default=1024)),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=6),
            "normalize": renorm(c.bool("norm_topk_prob", default=True)),
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.0005)},
        "layers": qwen_layers(c, dense_default=(0, 1)),  # Flint's mlp_only_layers default
        "checkpoint": {"shared_key": "shared_expert"},
        "_block": "FlintSparseMoeBlock",
    }


def longcat_flash(c: HFConfig) -> dict:
    """LongCat-Flash: softmax over E + Z logits (Z = zero_expert_num identity experts), + bias for
    selection, no renorm, x routed_scaling_factor. ``router_bias`` makes a bias that is never used.
    """
    count = c.int("num_layers", default=28)
    return {
        "experts": group(
            c, c.int("expert_ffn_hidden_size", "moe_intermediate_size"), c.int("n_routed_experts")
        ),
        "zero_experts": c.int("zero_expert_num", default=0),
        "router": {
            "top_k": c.int("moe_topk", "num_experts_per_tok", default=12),
            "selection_bias": "scores",
            "scale": c.float("routed_scaling_factor", default=6.0),
        },
        "layers": c.layers(list(range(count)), count, "every layer (num_layers) has an MoE"),
        "checkpoint": {
            "router_key": "router.classifier",
            "bias_key": "router.e_score_correction_bias",
        },
        "_block": "LongcatFlashMoE",
    }
