"""Builders for routers that rank raw logits (gpt-oss, Llama 4, Granite, JetMoE, Cohere2, Aria) and
the special ones: DBRX (p-norm), PhiMoE (sparsemixer) and Switch (top-1 with capacity).

All of these but the OpenAI privacy filter (fp32) and Switch (``router_dtype``) compute the router
GEMM in the input dtype (``router.dtype: input``).
"""

from __future__ import annotations

from moec.importers.hf_common import all_layers, group, renorm, shared
from moec.importers.hf_config import HFConfig


def gpt_oss(c: HFConfig) -> dict:
    """gpt-oss: router Linear with bias, top-k on logits, softmax over the k; clamped GLU
    ``(clamp(u, ±L) + 1) · g' · σ(α g')`` with ``g' = min(g, L)`` and expert biases (``hidden_act`` unused);
    ``gate_up_proj`` is x@W with gate/up interleaved (checkpoint layout ``gpt_oss``)."""
    experts = group(
        c,
        c.int("intermediate_size"),
        c.int("num_local_experts", "num_experts"),
        act="silu",
        glu="gpt_oss",
        limit=c.float("swiglu_limit", default=7.0),
        alpha=c.float("swiglu_alpha", default=1.702),
        bias=True,
    )
    return {
        "experts": experts,
        "router": {
            "top_k": c.int("num_experts_per_tok", default=4),
            "topk_on": "logits",
            "linear_bias": True,
            "dtype": "input",  # the softmax over the k runs in the logits dtype
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "gpt_oss"},
        "_block": "GptOssMLP",
    }


def llama4(c: HFConfig) -> dict:
    """Llama 4: top-k on logits, sigmoid of the selected logits (no renorm); the weight scales the
    expert *input*; an ungated shared SwiGLU of width intermediate_size. HF computes no aux loss."""
    ffn = c.int("intermediate_size")
    count = c.int("num_hidden_layers")
    step = c.int("interleave_moe_layer_step", default=1)
    moe = c.get("moe_layers", default=None)
    moe = list(moe) if moe is not None else list(range(step - 1, count, step))
    return {
        "experts": group(c, ffn, c.int("num_local_experts")),
        "shared": shared(c, ffn),
        "router": {
            "score": "sigmoid",
            "top_k": c.int("num_experts_per_tok", default=1),
            "topk_on": "logits",
            "dtype": "input",  # Llama4Router is an nn.Linear
        },
        "weight_on": "input",
        "layers": c.layers(moe, count, f"moe_layers / interleave_moe_layer_step={step}"),
        "checkpoint": {"layout": "llama4"},
        "_block": "Llama4TextMoe",
        "_note": "Llama4TextMoe returns (y[T, H], router_logits)",
    }


def granitemoe(c: HFConfig) -> dict:
    """Granite-MoE: top-k on logits, softmax over the k (≡ Mixtral)."""
    return {
        "experts": group(c, c.int("intermediate_size"), c.int("num_local_experts")),
        "router": {
            "top_k": c.int("num_experts_per_tok", default=2),
            "topk_on": "logits",
            "dtype": "input",  # F.linear(x, W).float(): the GEMM in the input dtype
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "granite"},
        "_block": "GraniteMoeMoE",
    }


def jetmoe(c: HFConfig) -> dict:
    """JetMoE: top-k on logits, softmax over the k, plus one output bias [H] after the combine."""
    return {
        "experts": group(
            c,
            c.int("intermediate_size"),
            c.int("num_local_experts"),
            act=c.act("activation_function"),
        ),
        "router": {
            "top_k": c.int("num_experts_per_tok", default=2),
            "topk_on": "logits",
            "dtype": "input",  # self.layer(x).float(): the GEMM in the input dtype
        },
        "output_bias": True,
        "balance": {"aux_loss": c.float("aux_loss_coef", default=0.01)},
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "jetmoe"},
        "_block": "JetMoeMoE",
    }


def dbrx(c: HFConfig) -> dict:
    """DBRX (``ffn_config`` nested): softmax in the logits dtype, top-k, ``w / ||w||_p``."""
    ffn_cfg = c.get("ffn_config", default={})
    f = HFConfig(ffn_cfg, "dbrx ffn_config", c.layer)
    p = f.raw("moe_normalize_expert_weights", 1.0)
    router = {"top_k": f.int("moe_top_k", default=1), "dtype": "input"}
    if p is not None:
        router["normalize"] = {"kind": "pnorm", "p": float(p)}
    count = c.int("n_layers", "num_hidden_layers", default=24)
    return {
        "hidden": c.int("d_model", "hidden_size"),
        "experts": group(
            f,
            f.int("ffn_hidden_size"),
            f.int("moe_num_experts"),
            act=f.act("ffn_act_fn", default="silu"),
        ),
        "router": router,
        "balance": {"aux_loss": f.float("moe_loss_weight", default=0.01)},
        "layers": c.layers(list(range(count)), count, "every layer is MoE"),
        "checkpoint": {"layout": "dbrx"},
        "_block": "DbrxFFN",
    }


def phimoe(c: HFConfig) -> dict:
    """PhiMoE: sparsemixer, always top-2, ε = router_jitter_noise. ``num_experts_per_tok`` is ignored
    by the routing but is the k that PhimoeForCausalLM's aux loss counts."""
    eps = c.float("router_jitter_noise", default=0.01)
    if eps <= 0:
        raise c.refuse("router_jitter_noise = 0 makes sparsemixer a plain top-2 with weights 1.0")
    balance = {"aux_loss": c.float("router_aux_loss_coef", default=0.001)}
    loss_k = c.int("num_experts_per_tok", default=2)
    if balance["aux_loss"] and loss_k != 2:
        balance["aux_loss_top_k"] = loss_k
    return {
        "experts": group(c, c.int("intermediate_size"), c.int("num_local_experts")),
        "router": {
            "kind": "sparsemixer",
            "top_k": 2,
            "sparsemixer_eps": eps,
            "dtype": "input",  # PhimoeTopKRouter is an nn.Linear
        },
        "balance": balance,
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"router_key": "router"},
        "_block": "PhimoeSparseMoeBlock",
    }


def switch_transformers(c: HFConfig) -> dict:
    """Switch: softmax (router_dtype) -> argmax top-1, weight = max prob; eval still drops tokens past
    ``expert_capacity`` per sequence in token order. ReLU MLP experts. Own lb loss + z-loss."""
    count = c.int("num_layers", "num_hidden_layers", default=12)
    n_sparse = c.int("num_sparse_encoder_layers", default=3)
    step = count // n_sparse if n_sparse > 0 else count
    why = f"encoder: num_layers={count}, num_sparse_encoder_layers={n_sparse}"
    layers = c.layers_where(
        count, lambda i: (i % step == 1 or step == 1) if step > 0 else False, why
    )
    router_dtype = c.get("router_dtype", default="float32")
    return {
        "hidden": c.int("d_model", "hidden_size"),
        "experts": group(
            c,
            c.int("d_ff"),
            c.int("num_experts"),
            act=c.act("dense_act_fn", default="relu"),
            kind="mlp",
        ),
        "router": {
            "kind": "switch",
            "top_k": 1,
            "linear_bias": c.bool("router_bias", default=False),
            "dtype": "fp32" if router_dtype == "float32" else "input",
        },
        "capacity": {
            "tokens": c.int("expert_capacity", default=64),
            "scope": "sequence",
            "drop": "position",
        },
        "balance": {
            "aux_loss": c.float("router_aux_loss_coef", default=0.001),
            "aux_loss_type": "switch",
            "z_loss": c.float("router_z_loss_coef", default=0.001),
        },
        "layers": layers,
        "checkpoint": {"layout": "switch"},
        "_block": "SwitchTransformersSparseMLP",
    }


def cohere2_moe(c: HFConfig) -> dict:
    """Cohere2-MoE: top-k on logits, then softmax over the k, or sigmoid of the k (+ flag renorm);
    shared experts summed, or averaged with the routed output: ``(routed + shared) / 2``."""
    fn = c.get("expert_selection_fn", default="softmax")
    router: dict = {
        "top_k": c.int("num_experts_per_tok", default=2),
        "topk_on": "logits",
        "dtype": "input",
    }
    if fn == "sigmoid":
        router.update(score="sigmoid", normalize=renorm(c.bool("norm_topk_prob", default=True)))
    elif fn != "softmax":
        raise c.refuse(f"expert_selection_fn {fn!r} (transformers knows softmax and sigmoid)")
    ffn = c.int("intermediate_size")
    n_shared = c.int("num_shared_experts", default=0)
    combine = c.get("shared_expert_combination_strategy", default="average")
    if combine not in ("sum", "average"):
        raise c.refuse(f"shared_expert_combination_strategy {combine!r}")
    count = c.int("num_hidden_layers")
    dense = c.int("first_k_dense_replace", default=0)
    types = c.get("mlp_layer_types", default=None)
    moe = [i for i, t in enumerate(types) if t != "dense"] if types else list(range(dense, count))
    return {
        "experts": group(c, ffn, c.int("num_experts")),
        "shared": shared(c, ffn * n_shared, combine=combine),
        "router": router,
        "layers": c.layers(moe, len(types) if types else count, "mlp_layer_types"),
        "_block": "Cohere2MoeSparseMoeBlock",
    }


def aria(c: HFConfig) -> dict:
    """Aria (``text_config``): top-k on logits, softmax over the k; experts in x@W layout and always
    SiLU (``hidden_act`` applies to the shared experts only)."""
    ffn = c.int("intermediate_size")
    return {
        "experts": group(c, ffn, c.int("moe_num_experts"), act="silu"),
        "shared": shared(
            c,
            ffn * c.int("moe_num_shared_experts", default=2),
            bias=c.bool("mlp_bias", default=False),
        ),
        "router": {"top_k": c.int("moe_topk", default=2), "topk_on": "logits", "dtype": "input"},
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "llama4", "shared_key": "shared_experts"},
        "_block": "AriaTextMoELayer",
    }


def openai_privacy_filter(c: HFConfig) -> dict:
    """OpenAI privacy filter: the gpt-oss router (bias, top-k on logits, softmax over the k), then
    weights / k (router scale 1/k) and the routed sum x k (routed_scale k); gpt-oss GLU with
    non-interleaved halves and biases, x@W layout."""
    experts = group(
        c,
        c.int("intermediate_size"),
        c.int("num_local_experts", "num_experts"),
        act="silu",
        glu="gpt_oss",
        limit=c.float("swiglu_limit", default=7.0),
        alpha=c.float("swiglu_alpha", default=1.702),
        bias=True,
    )
    k = c.int("num_experts_per_tok", default=4)
    return {
        "experts": experts,
        "router": {"top_k": k, "topk_on": "logits", "linear_bias": True, "scale": 1.0 / k},
        "routed_scale": float(k),
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "llama4"},
        "_block": "OpenAIPrivacyFilterMLP",
    }
