"""Tiny random Hugging Face MoE blocks, one case per architecture quirk, for the equivalence tests.

Each ``Case`` says how to build a transformers 5.23 config (float32, hidden 40-56, 4-16 experts, odd widths
where legal) and its MoE block, how to read ``y`` from the block's output (some return tuples), where the
router logits come from (a forward hook on the router module) and which balancing losses transformers
computes from them. ``build`` randomises every parameter *and* float buffer, so selection biases and
router biases that default to zero are exercised.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

B, S = 2, 7  # the equivalence tests' batch


@dataclass(frozen=True)
class Case:
    id: str
    module: str  # transformers.models.<module>.modeling_<module>
    config_cls: str
    config: dict[str, Any]
    block_cls: str
    router: str  # attribute path of the router module inside the block
    logits_at: int | None = 0  # index of the logits in the router's output tuple (None: the output)
    out_at: int | None = None  # index of y in the block's output tuple (None: the output)
    loss: str | None = None  # "std" (load_balancing_loss_func) | "switch" | None
    top_k: int | None = None  # k for HF's std loss (the config's num_experts_per_tok by default)
    block_kwargs: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None  # the layer argument of import_hf_config
    module_file: str | None = None  # modeling file when it is not modeling_<module>
    bias_shift: float = 0.0  # added to the random float buffers (negative: sigmoid + bias < 0)

    def modeling(self):
        name = self.module_file or f"modeling_{self.module}"
        return importlib.import_module(f"transformers.models.{self.module}.{name}")

    def make_config(self):
        conf = importlib.import_module(
            f"transformers.models.{self.module}.configuration_{self.module}"
        )
        cfg = getattr(conf, self.config_cls)(**self.config)
        cfg._experts_implementation = "eager"
        return cfg


def _attn(**kw) -> dict:
    """Attention sizes that every config class accepts (the block never uses them)."""
    return {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, **kw}


CASES: tuple[Case, ...] = (
    Case(
        "mixtral",
        "mixtral",
        "MixtralConfig",
        _attn(  # odd widths: hidden 44, ffn 37
            hidden_size=44,
            intermediate_size=37,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.02,
        ),
        "MixtralSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "minimax",
        "minimax",
        "MiniMaxConfig",
        _attn(hidden_size=40, intermediate_size=36, num_local_experts=6, num_experts_per_tok=3),
        "MiniMaxSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen2_moe",
        "qwen2_moe",
        "Qwen2MoeConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
        ),
        "Qwen2MoeSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen2_moe_norm",
        "qwen2_moe",
        "Qwen2MoeConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            decoder_sparse_step=2,
        ),
        "Qwen2MoeSparseMoeBlock",
        "gate",
        loss="std",
        layer=1,
    ),
    Case(
        "qwen3_moe",
        "qwen3_moe",
        "Qwen3MoeConfig",
        _attn(
            hidden_size=52,
            moe_intermediate_size=21,
            num_experts=12,
            num_experts_per_tok=4,
            norm_topk_prob=True,
        ),
        "Qwen3MoeSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen3_next",
        "qwen3_next",
        "Qwen3NextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=10,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        "Qwen3NextSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen3_5_moe",
        "qwen3_5_moe",
        "Qwen3_5MoeTextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=28,
            num_experts=8,
            num_experts_per_tok=3,
        ),
        "Qwen3_5MoeSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "olmoe",
        "olmoe",
        "OlmoeConfig",
        _attn(hidden_size=48, intermediate_size=36, num_experts=8, num_experts_per_tok=2),
        "OlmoeSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "flex_olmo",
        "flex_olmo",
        "FlexOlmoConfig",
        _attn(
            hidden_size=48,
            intermediate_size=28,
            num_experts=7,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        "FlexOlmoSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "jamba",
        "jamba",
        "JambaConfig",
        _attn(
            hidden_size=48,
            intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
            num_hidden_layers=4,
            attn_layer_period=2,
            attn_layer_offset=0,
        ),
        "JambaSparseMoeBlock",
        "router",
        loss="std",
    ),
    Case(
        "deepseek_v2",
        "deepseek_v2",
        "DeepseekV2Config",
        # norm_topk_prob=True is ignored by transformers: the weights stay unnormalised
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            routed_scaling_factor=1.5,
            norm_topk_prob=True,
            topk_method="greedy",
        ),
        "DeepseekV2Moe",
        "gate",
    ),
    Case(
        "deepseek_v2_group",
        "deepseek_v2",
        "DeepseekV2Config",
        _attn(
            hidden_size=48,
            moe_intermediate_size=20,
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_shared_experts=1,
            routed_scaling_factor=2.0,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
        ),
        "DeepseekV2Moe",
        "gate",
    ),
    Case(
        "deepseek_v3",
        "deepseek_v3",
        "DeepseekV3Config",
        _attn(
            hidden_size=48,
            moe_intermediate_size=23,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
            q_lora_rank=None,
        ),
        "DeepseekV3MoE",
        "gate",
        layer=1,
    ),
    Case(
        "glm4_moe",
        "glm4_moe",
        "Glm4MoeConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=28,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            routed_scaling_factor=1.5,
        ),
        "Glm4MoeMoE",
        "gate",
        layer=1,
    ),
    Case(
        "dots1",
        "dots1",
        "Dots1Config",
        _attn(
            hidden_size=48,
            moe_intermediate_size=20,
            n_routed_experts=12,
            num_experts_per_tok=2,
            n_shared_experts=2,
            n_group=3,
            topk_group=1,
            norm_topk_prob=False,
        ),
        "Dots1MoE",
        "gate",
    ),
    Case(
        "bailing_hybrid",
        "bailing_hybrid",
        "BailingHybridConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            num_experts=16,
            num_experts_per_token=4,
            num_shared_experts=1,
            num_expert_group=4,
            topk_group=2,
            first_k_dense_replace=1,
        ),
        "BailingHybridMoE",
        "gate",
        layer=1,
    ),
    Case(
        "ernie4_5_moe",
        "ernie4_5_moe",
        "Ernie4_5_MoeConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            moe_num_experts=8,
            moe_k=3,
            moe_num_shared_experts=1,
            use_bias=True,
        ),
        "Ernie4_5_MoeSparseMoeBlock",
        "gate",
        loss="std",
        layer=1,
    ),
    Case(
        "hunyuan_v1_moe",
        "hunyuan_v1_moe",
        "HunYuanMoEV1Config",
        _attn(hidden_size=48, intermediate_size=32, num_experts=8, moe_topk=[2, 3]),
        "HunYuanMoEV1Moe",
        "gate",
        block_kwargs={"layer_idx": 1},
        layer=1,
    ),
    Case(
        "gpt_oss",
        "gpt_oss",
        "GptOssConfig",
        # a small clamp limit so that both clamps bite on random weights
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=3,
            swiglu_limit=0.9,
            head_dim=12,
        ),
        "GptOssMLP",
        "router",
        out_at=0,
        loss="std",
    ),
    Case(
        "llama4",
        "llama4",
        "Llama4TextConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            intermediate_size_mlp=40,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=12,
        ),
        "Llama4TextMoe",
        "router",
        logits_at=1,
        out_at=0,
    ),
    Case(
        "dbrx",
        "dbrx",
        "DbrxConfig",
        {
            "d_model": 48,
            "n_heads": 4,
            "n_layers": 2,
            "ffn_config": {
                "ffn_hidden_size": 24,
                "moe_num_experts": 8,
                "moe_top_k": 3,
                "moe_loss_weight": 0.05,
            },
        },
        "DbrxFFN",
        "router",
        logits_at=None,
        loss="std",
        top_k=3,
    ),
    Case(
        "dbrx_p2",
        "dbrx",
        "DbrxConfig",
        {
            "d_model": 40,
            "n_heads": 4,
            "n_layers": 2,
            "ffn_config": {
                "ffn_hidden_size": 20,
                "moe_num_experts": 6,
                "moe_top_k": 2,
                "moe_normalize_expert_weights": 2.0,
            },
        },
        "DbrxFFN",
        "router",
        logits_at=None,
    ),
    Case(
        "granitemoe",
        "granitemoe",
        "GraniteMoeConfig",
        _attn(hidden_size=48, intermediate_size=24, num_local_experts=8, num_experts_per_tok=3),
        "GraniteMoeMoE",
        "router",
        loss="std",
    ),
    Case(
        "jetmoe",
        "jetmoe",
        "JetMoeConfig",
        {
            "hidden_size": 48,
            "intermediate_size": 24,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "num_key_value_heads": 2,
            "kv_channels": 12,
            "num_hidden_layers": 2,
        },
        "JetMoeMoE",
        "router",
        logits_at=4,
        loss="std",
    ),
    Case(
        "phimoe",
        "phimoe",
        "PhimoeConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_jitter_noise=0.01,
        ),
        "PhimoeSparseMoeBlock",
        "router",
        loss="std",
    ),
    Case(
        "phimoe_eps05",
        "phimoe",
        "PhimoeConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_jitter_noise=0.5,
        ),
        "PhimoeSparseMoeBlock",
        "router",
        loss="std",
    ),
    Case(
        "switch_transformers",
        "switch_transformers",
        "SwitchTransformersConfig",
        # capacity 2 of 7 tokens per sequence over 4 experts: some tokens are dropped
        {
            "d_model": 48,
            "d_ff": 40,
            "num_experts": 4,
            "expert_capacity": 2,
            "num_layers": 4,
            "num_sparse_encoder_layers": 2,
            "num_decoder_layers": 4,
            "num_sparse_decoder_layers": 2,
            "num_heads": 4,
            "d_kv": 12,
            "router_bias": True,
            "router_z_loss_coef": 0.002,
            "router_aux_loss_coef": 0.003,
        },
        "SwitchTransformersSparseMLP",
        "router",
        logits_at=2,
        loss="switch",
    ),
)


def _v3(**kw) -> dict:
    return _attn(hidden_size=48, moe_intermediate_size=24, **kw)


EXTRA_CASES: tuple[Case, ...] = (
    Case(
        "qwen4_exp",
        "qwen4_exp",
        "Qwen4ExpTextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_experts=10,
            num_experts_per_tok=3,
            norm_topk_prob=False,
            head_dim=12,
        ),
        "Qwen4ExpTextSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen3_vl_moe",
        "qwen3_vl_moe",
        "Qwen3VLMoeTextConfig",
        _attn(hidden_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3),
        "Qwen3VLMoeTextSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "glm4v_moe",
        "glm4v_moe",
        "Glm4vMoeTextConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
        ),
        "Glm4vMoeTextMoE",
        "gate",
        loss="std",
        layer=1,
    ),
    Case(
        "deepseek_v32",
        "deepseek_v32",
        "DeepseekV32Config",
        _v3(
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
        ),
        "DeepseekV32MoE",
        "gate",
        layer=1,
    ),
    Case(
        "hy_v4",
        "hy_v4",
        "HYV4Config",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            swiglu_limit=0.6,
            n_group=2,
            topk_group=1,
            head_dim=12,
        ),
        "HYV4MoE",
        "gate",
        layer=1,
    ),
    Case(
        "mistral_large4",
        "mistral_large4",
        "MistralLarge4TextConfig",
        _v3(
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.3,
            q_lora_rank=None,
        ),
        "MistralLarge4TextMoE",
        "gate",
        layer=1,
    ),
    Case(
        "glm4_moe_lite",
        "glm4_moe_lite",
        "Glm4MoeLiteConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            routed_scaling_factor=1.8,
            n_group=2,
            topk_group=1,
        ),
        "Glm4MoeLiteMoE",
        "gate",
        layer=1,
    ),
    Case(
        "kimi_linear",
        "kimi_linear",
        "KimiLinearConfig",
        _v3(
            num_experts=8,
            num_experts_per_token=3,
            num_shared_experts=2,
            routed_scaling_factor=2.446,
            num_expert_group=4,
            topk_group=2,
            moe_renormalize=True,
        ),
        "KimiLinearMoE",
        "gate",
        layer=1,
    ),
    Case(
        "exaone_moe",
        "exaone_moe",
        "ExaoneMoeConfig",
        _v3(num_experts=12, num_experts_per_tok=3, num_shared_experts=1, routed_scaling_factor=2.5),
        "ExaoneMoeSparseMoEBlock",
        "gate",
        layer=1,
    ),
    Case(
        "solar_open",
        "solar_open",
        "SolarOpenConfig",
        _v3(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, norm_topk_prob=False),
        "SolarOpenMoE",
        "gate",
    ),
    Case(
        "mimo_v2_flash",
        "mimo_v2_flash",
        "MiMoV2FlashConfig",
        _v3(n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1, head_dim=12),
        "MiMoV2FlashMoE",
        "gate",
        layer=1,
    ),
    Case(
        "glm5_next",
        "glm5_next",
        "Glm5NextTextConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            swiglu_limit=0.6,
            num_hidden_layers=4,
            num_key_value_heads=4,
        ),
        "Glm5NextTextMoE",
        "gate",
        loss="std",
        layer=3,
    ),
    Case(
        "axk2",
        "axk2",
        "AXK2Config",
        # a negative selection bias makes some unmasked candidates score below the 0.0 fill
        _v3(n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2),
        "AXK2MoE",
        "gate",
        layer=1,
        bias_shift=-0.55,
    ),
    Case(
        "mistral4",
        "mistral4",
        "Mistral4Config",
        _v3(
            n_routed_experts=12,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.3,
            norm_topk_prob=False,
            q_lora_rank=None,
        ),
        "Mistral4MoE",
        "gate",
    ),
    Case(
        "beam",
        "beam",
        "BeamConfig",
        _v3(
            num_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            num_hidden_layers=4,
            head_dim=12,
        ),
        "BeamMoE",
        "gate",
        layer=3,
    ),
    Case(
        "deepseek_v4",
        "deepseek_v4",
        "DeepseekV4Config",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            swiglu_limit=0.7,
            num_hidden_layers=4,
            head_dim=12,
        ),
        "DeepseekV4SparseMoeBlock",
        "gate",
        loss="std",
        block_kwargs={"layer_idx": 3},
        layer=3,
    ),
    Case(
        "inkling2",
        "inkling2",
        "Inkling2TextConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            route_scale=3.0,
            mlp_gate_softcap=0.5,
            mlp_up_softcap=0.7,
            head_dim=12,
        ),
        "Inkling2SparseMoeBlock",
        "gate",
    ),
    Case(
        "minimax_m2",
        "minimax_m2",
        "MiniMaxM2Config",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=3,
            head_dim=12,
        ),
        "MiniMaxM2SparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "minimax_m3_vl",
        "minimax_m3_vl",
        "MiniMaxM3VLTextConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=3,
            shared_intermediate_size=20,
            swiglu_limit=0.8,
            routed_scaling_factor=2.0,
            head_dim=12,
        ),
        "MiniMaxM3VLSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "step3p7",
        "step3p7",
        "Step3p7TextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=3,
            share_expert_dim=20,
            swiglu_limits=[0, 0.8],
            swiglu_limits_shared=[0, 0.9],
            moe_router_scaling_factor=1.7,
            mlp_layer_types=["dense", "sparse"],
            head_dim=12,
        ),
        "Step3p7SparseMoeBlock",
        "gate",
        block_kwargs={"layer_idx": 1},
        layer=1,
    ),
    Case(
        "afmoe",
        "afmoe",
        "AfmoeConfig",
        _v3(
            num_experts=8, num_experts_per_tok=3, num_shared_experts=1, route_scale=1.6, head_dim=12
        ),
        "AfmoeSparseMoeBlock",
        "router",
        layer=1,
    ),
    Case(
        "hy_v3",
        "hy_v3",
        "HYV3Config",
        _v3(
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=1,
            router_scaling_factor=2.8,
            head_dim=12,
        ),
        "HYV3MoE",
        "gate",
        layer=1,
    ),
    Case(
        "laguna",
        "laguna",
        "LagunaConfig",
        _v3(
            num_experts=8,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=20,
            moe_router_logit_softcapping=1.5,
            moe_routed_scaling_factor=1.7,
            head_dim=12,
        ),
        "LagunaSparseMoeBlock",
        "gate",
        loss="std",
        layer=1,
    ),
    Case(
        "lfm2_moe",
        "lfm2_moe",
        "Lfm2MoeConfig",
        # hidden_act gelu: the experts still use SiLU
        _v3(
            num_experts=8,
            num_experts_per_tok=3,
            routed_scaling_factor=1.4,
            hidden_act="gelu",
            num_dense_layers=1,
        ),
        "Lfm2MoeSparseMoeBlock",
        "gate",
        layer=1,
    ),
    Case(
        "kolibri1",
        "kolibri1",
        "Kolibri1Config",
        _v3(
            num_experts=8,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=20,
            norm_topk_prob=True,
            head_dim=12,
        ),
        "Kolibri1SparseMoeBlock",
        "gate",
    ),
    Case(
        "flint",
        "flint",
        "FlintConfig",
        _v3(
            num_experts=8,
            num_experts_per_tok=3,
            shared_expert_intermediate_size=20,
            norm_topk_prob=False,
            num_hidden_layers=4,
        ),
        "FlintSparseMoeBlock",
        "gate",
        loss="std",
        layer=2,
    ),
    Case(
        "longcat_flash",
        "longcat_flash",
        "LongcatFlashConfig",
        {
            "hidden_size": 48,
            "expert_ffn_hidden_size": 24,
            "n_routed_experts": 6,
            "zero_expert_num": 3,
            "moe_topk": 3,
            "routed_scaling_factor": 1.5,
            "num_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "LongcatFlashMoE",
        "router",
    ),
    Case(
        "nemotron_h",
        "nemotron_h",
        "NemotronHConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_shared_expert_intermediate_size=20,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            mlp_bias=True,
            layers_block_type=["moe", "full_attention"],
        ),
        "NemotronHMoE",
        "gate",
    ),
    Case(
        "nemotron_h_latent",
        "nemotron_h",
        "NemotronHConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_shared_expert_intermediate_size=20,
            moe_latent_size=16,
            layers_block_type=["moe", "moe"],
        ),
        "NemotronHMoE",
        "gate",
    ),
    Case(
        "cohere2_moe",
        "cohere2_moe",
        "Cohere2MoeConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            num_shared_experts=1,
            shared_expert_combination_strategy="average",
        ),
        "Cohere2MoeSparseMoeBlock",
        "gate",
    ),
    Case(
        "cohere2_moe_sigmoid",
        "cohere2_moe",
        "Cohere2MoeConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            num_shared_experts=2,
            shared_expert_combination_strategy="sum",
            expert_selection_fn="sigmoid",
            norm_topk_prob=True,
        ),
        "Cohere2MoeSparseMoeBlock",
        "gate",
    ),
    Case(
        "aria",
        "aria",
        "AriaTextConfig",
        # hidden_act applies to the shared experts only; routed experts are always SiLU
        _attn(
            hidden_size=48,
            intermediate_size=24,
            moe_num_experts=8,
            moe_topk=2,
            moe_num_shared_experts=1,
            hidden_act="gelu_pytorch_tanh",
        ),
        "AriaTextMoELayer",
        "router",
    ),
    Case(
        "openai_privacy_filter",
        "openai_privacy_filter",
        "OpenAIPrivacyFilterConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=3,
            swiglu_limit=0.9,
            head_dim=12,
        ),
        "OpenAIPrivacyFilterMLP",
        "router",
        out_at=0,
    ),
    Case(
        "mellum",
        "mellum",
        "MellumConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            head_dim=12,
        ),
        "MellumSparseMoeBlock",
        "gate",
        loss="std",
    ),
    # PhimoeForCausalLM's aux loss counts num_experts_per_tok slots; the sparsemixer still routes two
    Case(
        "phimoe_k3",
        "phimoe",
        "PhimoeConfig",
        _attn(
            hidden_size=48,
            intermediate_size=24,
            num_local_experts=8,
            num_experts_per_tok=3,
            router_jitter_noise=0.5,
        ),
        "PhimoeSparseMoeBlock",
        "router",
        loss="std",
    ),
    Case(
        "glm_moe_dsa",
        "glm_moe_dsa",
        "GlmMoeDsaConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
            first_k_dense_replace=1,
            head_dim=12,
        ),
        "GlmMoeDsaMoE",
        "gate",
        layer=1,
    ),
    Case(
        "dots3_note",
        "dots3_note",
        "Dots3NoteTextConfig",
        # the shared experts' width is shared_experts_intermediate_size, not moe_intermediate_size
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            shared_experts_intermediate_size=20,
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.3,
            num_key_value_heads=4,
        ),
        "Dots3NoteTextMoE",
        "gate",
        layer=1,
    ),
    Case(
        "deepseek_ocr2",
        "deepseek_ocr2",
        "DeepseekOcr2TextConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            routed_scaling_factor=1.2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            mlp_layer_types=["dense", "sparse"],
        ),
        "DeepseekOcr2TextMoe",
        "gate",
        layer=1,
    ),
    Case(
        "unlimited_ocr",
        "unlimited_ocr",
        "UnlimitedOcrTextConfig",
        _v3(
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            routed_scaling_factor=1.2,
            num_key_value_heads=4,
        ),
        "UnlimitedOcrTextMoe",
        "gate",
        layer=1,
    ),
    Case(
        "qwen3_omni_moe",
        "qwen3_omni_moe",
        "Qwen3OmniMoeTextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=False,
        ),
        "Qwen3OmniMoeThinkerTextSparseMoeBlock",
        "gate",
        loss="std",
    ),
    Case(
        "qwen3_omni_moe_talker",
        "qwen3_omni_moe",
        "Qwen3OmniMoeTalkerTextConfig",
        _attn(
            hidden_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=20,
            num_experts=8,
            num_experts_per_tok=3,
            norm_topk_prob=True,
        ),
        "Qwen3OmniMoeTalkerTextSparseMoeBlock",
        "gate",
        loss="std",
    ),
)

CASES = CASES + EXTRA_CASES

BY_ID = {case.id: case for case in CASES}


def build(case: Case, seed: int = 0):
    """The HF config and block of ``case`` with every parameter and float buffer random (eval mode)."""
    cfg = case.make_config()
    torch.manual_seed(seed)
    block = getattr(case.modeling(), case.block_cls)(cfg, **case.block_kwargs)
    return cfg, randomize(block, seed, case.bias_shift)


def randomize(block, seed: int = 0, bias_shift: float = 0.0):
    """Every parameter N(0, 0.15²) (routers 0.3²) and every float buffer (selection biases)
    N(bias_shift, 0.1²); returns the block in float32 eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            std = 0.3 if ("router" in name or "gate" in name.split(".")[0]) else 0.15
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        for buf in block.buffers():
            if buf.is_floating_point():  # selection biases (e_score_correction_bias, ...)
                buf.copy_(torch.randn(buf.shape, generator=gen) * 0.1 + bias_shift)
    return block.float().eval()


def run(case: Case, block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [B, S, H], router logits [T, E]) of the HF block on ``x`` [B, S, H]."""
    router = block.get_submodule(case.router)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append(output if case.logits_at is None else output[case.logits_at])

    handle = router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        handle.remove()
    y = out if case.out_at is None else out[case.out_at]
    return y.reshape(x.shape), seen[-1].reshape(-1, seen[-1].shape[-1])


def hf_losses(case: Case, cfg, logits: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The balancing losses transformers computes from one layer's router logits (no coefficients)."""
    if case.loss == "std":
        k = case.top_k or cfg.num_experts_per_tok
        fn = case.modeling().load_balancing_loss_func
        return {"aux_loss": fn((logits,), logits.shape[-1], k)}
    if case.loss == "switch":
        m = case.modeling()
        logits3 = logits.reshape(x.shape[0], x.shape[1], -1)
        probs = torch.softmax(logits3, dim=-1)
        return {
            "aux_loss": m.load_balancing_loss_func(probs, logits3.argmax(dim=-1)),
            "z_loss": m.router_z_loss_func(logits3),
        }
    return {}
