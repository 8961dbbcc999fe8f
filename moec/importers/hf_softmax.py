"""Builders for softmax-over-all-experts routers: Mixtral, Qwen, OLMoE, Jamba, Ernie, HunYuan, DeepSeek-V2.

Each builder reads the config the way transformers 5.23's modeling code does (the ground truth;
HF_MOE_SEMANTICS.md summarises it) and returns spec data for ``experts``, ``shared``, ``router`` and
friends, plus ``_block`` (the HF module class, for provenance) and an optional ``_note``. Defaults are
the 5.23 config-class defaults.

Router GEMM precision: Mixtral, the Qwen family, OLMoE and Jamba run ``F.linear(x, W)`` in the input
dtype (``router.dtype: input``); Ernie, HunYuan and DeepSeek-V2 upcast to fp32 (the default).
"""

from __future__ import annotations

from moec.importers.hf_common import (
    all_layers,
    deepseek_balance,
    dense_first,
    dense_prefix,
    group,
    mlp_types_layers,
    qwen_layers,
    renorm,
    shared,
)
from moec.importers.hf_config import HFConfig


def mixtral(c: HFConfig) -> dict:
    """Mixtral / MiniMax: logits in the input dtype, softmax over all experts (fp32), top-k, always
    renormalised (no flag)."""
    return {
        "experts": group(c, c.int("intermediate_size"), c.int("num_local_experts", "num_experts")),
        "router": {
            "top_k": c.int("num_experts_per_tok", default=2),
            "normalize": renorm(True),
            "dtype": "input",
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "MixtralSparseMoeBlock" if c.model_type == "mixtral" else "MiniMaxSparseMoeBlock",
    }


def hunyuan_v1_moe(c: HFConfig) -> dict:
    """HunYuan-V1-MoE: Mixtral routing (``gate.wg`` is built in fp32 and the input upcast, so the
    router stays fp32); shared MLP of width intermediate_size.

    ``num_experts`` and ``moe_topk`` may be per-layer lists. HF uses ``intermediate_size`` for the experts
    and the shared MLP alike (a hub ``moe_intermediate_size`` is ignored by transformers).
    """
    ffn = c.int("intermediate_size")
    return {
        "experts": group(c, ffn, c.int("num_experts", "num_local_experts", per_layer=True)),
        "shared": shared(c, ffn),
        "router": {
            "top_k": c.int("moe_topk", "num_experts_per_tok", default=1, per_layer=True),
            "normalize": renorm(True),
        },
        "layers": all_layers(c, "num_hidden_layers"),
        "checkpoint": {"layout": "hunyuan"},
        "_block": "HunYuanMoEV1Moe",
    }


def _qwen_like(c: HFConfig, *, norm: bool, ffn_key: str, gated_shared: bool, aux: float) -> dict:
    """The Qwen2/3-MoE router (OLMoE, Mellum, ... too): logits ``F.linear(x, W)`` in the input
    dtype, softmax in fp32, top-k, flag renorm."""
    data = {
        "experts": group(c, c.int(ffn_key), c.int("num_experts", "num_local_experts")),
        "router": {
            "top_k": c.int("num_experts_per_tok"),
            "normalize": renorm(norm),
            "dtype": "input",
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=aux)},
    }
    if gated_shared:
        # One shared SwiGLU scaled by sigmoid(Linear(H -> 1)), then added (never renormalised).
        fs = c.int("shared_expert_intermediate_size")
        data["shared"] = shared(c, fs, gate="sigmoid_linear")
        data["checkpoint"] = {"shared_key": "shared_expert"}
    return data


def qwen2_moe(c: HFConfig) -> dict:
    flag = c.bool("norm_topk_prob", default=False)  # default False: raw softmax probabilities
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=True, aux=0.001)
    return {**data, "layers": qwen_layers(c), "_block": "Qwen2MoeSparseMoeBlock"}


def qwen3_moe(c: HFConfig) -> dict:
    flag = c.bool("norm_topk_prob", default=False)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=False, aux=0.001)
    return {**data, "layers": qwen_layers(c), "_block": "Qwen3MoeSparseMoeBlock"}


def qwen3_next(c: HFConfig) -> dict:
    flag = c.bool("norm_topk_prob", default=True)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=True, aux=0.001)
    return {**data, "layers": qwen_layers(c), "_block": "Qwen3NextSparseMoeBlock"}


def qwen3_5_moe(c: HFConfig) -> dict:
    """Qwen3.5-MoE: the Qwen2-MoE block, but the router always renormalises (no flag)."""
    data = _qwen_like(c, norm=True, ffn_key="moe_intermediate_size", gated_shared=True, aux=0.001)
    return {
        **data,
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "Qwen3_5MoeSparseMoeBlock",
    }


def qwen4_exp(c: HFConfig) -> dict:
    """Qwen4-Exp (``text_config``): the Qwen3-Next block (gated shared expert, flag renorm); every
    decoder layer is MoE."""
    flag = c.bool("norm_topk_prob", default=True)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=True, aux=0.001)
    return {
        **data,
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "Qwen4ExpTextSparseMoeBlock",
    }


def qwen3_vl_moe(c: HFConfig) -> dict:
    """Qwen3-VL-MoE (``text_config``): the Qwen3-MoE block, but the router always renormalises."""
    data = _qwen_like(c, norm=True, ffn_key="moe_intermediate_size", gated_shared=False, aux=0.001)
    return {**data, "layers": qwen_layers(c), "_block": "Qwen3VLMoeTextSparseMoeBlock"}


def qwen3_omni_moe(c: HFConfig) -> dict:
    """Qwen3-Omni-MoE thinker (``thinker_config.text_config``): the Qwen3-MoE block (flag renorm,
    default on, no shared expert)."""
    flag = c.bool("norm_topk_prob", default=True)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=False, aux=0.001)
    return {
        **data,
        "layers": qwen_layers(c),
        "_block": "Qwen3OmniMoeThinkerTextSparseMoeBlock",
        "_note": "the thinker's MoE; the talker's imports from talker_config.text_config",
    }


def qwen3_omni_moe_talker(c: HFConfig) -> dict:
    """Qwen3-Omni-MoE talker (``talker_config.text_config``): the Qwen2-MoE block (sigmoid-gated
    shared expert, flag renorm, default off). Every decoder layer is MoE: the talker's layer replaces
    its MLP with the MoE block whatever mlp_only_layers and decoder_sparse_step say."""
    flag = c.bool("norm_topk_prob", default=False)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=True, aux=0.001)
    return {
        **data,
        "layers": all_layers(c, "num_hidden_layers"),
        "_block": "Qwen3OmniMoeTalkerTextSparseMoeBlock",
    }


def olmoe(c: HFConfig) -> dict:
    flag = c.bool("norm_topk_prob", default=False)
    data = _qwen_like(c, norm=flag, ffn_key="intermediate_size", gated_shared=False, aux=0.01)
    block = "OlmoeSparseMoeBlock" if c.model_type == "olmoe" else "FlexOlmoSparseMoeBlock"
    return {**data, "layers": all_layers(c, "num_hidden_layers"), "_block": block}


def mellum(c: HFConfig) -> dict:
    """Mellum: the Qwen3-MoE block (softmax, flag renorm, no shared expert)."""
    flag = c.bool("norm_topk_prob", default=True)
    data = _qwen_like(c, norm=flag, ffn_key="moe_intermediate_size", gated_shared=False, aux=0.001)
    count = c.int("num_hidden_layers")
    layers = mlp_types_layers(c, lambda: c.layers(list(range(count)), count, "all layers"))
    return {**data, "layers": layers, "_block": "MellumSparseMoeBlock"}


def jamba(c: HFConfig) -> dict:
    """Jamba: logits in the input dtype, softmax -> top-k, never renormalised; MoE every
    expert_layer_period from the offset."""
    period = c.int("expert_layer_period", default=2)
    offset = c.int("expert_layer_offset", default=1)
    count = c.int("num_hidden_layers")
    why = f"expert_layer_period={period}, expert_layer_offset={offset}"
    return {
        "experts": group(c, c.int("intermediate_size"), c.int("num_experts", "num_local_experts")),
        "router": {"top_k": c.int("num_experts_per_tok", default=2), "dtype": "input"},
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": c.layers_where(count, lambda i: i % period == offset, why),
        "checkpoint": {"router_key": "router"},
        "_block": "JambaSparseMoeBlock",
    }


def ernie4_5_moe(c: HFConfig) -> dict:
    """Ernie 4.5: the selection bias is added to the softmax *probabilities*; the renorm always runs,
    as ``w / clamp(sum, min=moe_norm_min)``. ``use_bias`` applies to the shared MLP only."""
    ffn = c.int("moe_intermediate_size")
    n_shared = c.int("moe_num_shared_experts", default=2)
    count = c.int("num_hidden_layers")
    start = c.int("moe_layer_start_index", default=1)
    end = c.int("moe_layer_end_index", default=-1)
    end = count - 1 if end == -1 else end
    interval = c.int("moe_layer_interval", default=1)
    why = f"moe_layer_start_index={start}, moe_layer_end_index={end}, interval={interval}"
    return {
        "experts": group(c, ffn, c.int("moe_num_experts", "num_experts")),
        "shared": shared(c, ffn * n_shared, bias=c.bool("use_bias", default=False)),
        "router": {
            "top_k": c.int("moe_k", "num_experts_per_tok", default=6),
            "selection_bias": "scores",
            "normalize": {"kind": "sum", "clamp_min": c.float("moe_norm_min", default=1e-12)},
        },
        "balance": {"aux_loss": c.float("router_aux_loss_coef", default=0.001)},
        "layers": c.layers_where(
            count, lambda i: (i + 1) % interval == 0 and start <= i <= end, why
        ),
        "checkpoint": {"layout": "ernie"},
        "_block": "Ernie4_5_MoeSparseMoeBlock",
    }


def deepseek_v2(c: HFConfig) -> dict:
    """DeepSeek-V2: softmax, ``norm_topk_prob`` ignored by HF (never renormalised), weights x scaling.

    ``group_limited_greedy``: group score = max in the group, other groups' scores set to 0.0, weights
    read from the masked scores.
    """
    return {
        **_deepseek_v2_block(c, top_k=c.int("num_experts_per_tok")),
        "layers": dense_prefix(c, default=0),
        "_block": "DeepseekV2Moe",
    }


OCR_BLOCKS = {"deepseek_ocr2": "DeepseekOcr2TextMoe", "unlimited_ocr": "UnlimitedOcrTextMoe"}


def deepseek_ocr(c: HFConfig) -> dict:
    """DeepSeek-OCR-2 and Unlimited-OCR (``text_config``): the DeepSeek-V2 block; the MoE layers are
    the ``mlp_layer_types`` "sparse" ones (Unlimited-OCR derives them from first_k_dense_replace,
    default 1, when the list is absent)."""
    if c.model_type == "deepseek_ocr2":  # no config defaults: transformers needs both keys
        c.get("mlp_layer_types")
        k = c.int("num_experts_per_tok")
    else:
        k = c.int("num_experts_per_tok", default=6)
    layers = mlp_types_layers(c, lambda: dense_first(c, "first_k_dense_replace", 1))
    return {**_deepseek_v2_block(c, top_k=k), "layers": layers, "_block": OCR_BLOCKS[c.model_type]}


def _deepseek_v2_block(c: HFConfig, top_k: int) -> dict:
    e = c.int("n_routed_experts", "num_experts")
    ffn = c.int("moe_intermediate_size")
    method = c.get("topk_method", default="greedy")
    router = {"top_k": top_k, "scale": c.float("routed_scaling_factor", default=1.0)}
    if method == "group_limited_greedy":
        router["groups"] = {
            "count": c.int("n_group"),
            "keep": c.int("topk_group"),
            "score": "max",
            "masked": "0",
            "weights_from": "masked",
        }
    elif method != "greedy":
        raise c.refuse(
            f"topk_method {method!r} (transformers implements 'greedy' and 'group_limited_greedy')"
        )
    return {
        "experts": group(c, ffn, e),
        "shared": shared(
            c, ffn * c.int("n_shared_experts", default=2), bias=c.bool("mlp_bias", default=False)
        ),
        "router": router,
        "balance": deepseek_balance(c),
    }
