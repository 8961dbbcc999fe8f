"""moec.importers.hf: HF config.json -> spec data -> YAML, for real models and every tiny case.

``specs/<name>.yaml`` for the real models below are golden files generated from
``tests/data/hf_configs/<file>.json`` plus a deployment (parallel / cluster) section; accept an intended
change with ``pytest tests/test_hf_import.py --update-golden``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moec.errors import UsageError
from moec.importers import (
    SUPPORTED_MODEL_TYPES,
    dump_spec_yaml,
    import_hf_config,
    training_only_notes,
)
from moec.spec import SourceMap, load_spec, load_spec_text, parse_spec

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "hf_configs"


def _deploy(nodes: int, gpus: int, gpu: str = "h100", tp: int = 1, ep: int | None = None, **extra):
    world = nodes * gpus
    data = {
        "parallel": {"dp": world // tp, "tp": tp, "ep": ep or world},
        "cluster": {"nodes": nodes, "gpus_per_node": gpus, "gpu": gpu},
    }
    return {**data, **extra}


SERVE = {"workload": {"tokens_per_rank": 4096, "mode": "serve"}}

# name: (config file, title, deployment merged into the imported spec). The big models are served
# (bf16 weights, no optimizer state); the planner checks that the experts fit the GPUs.
REAL_MODELS = {
    "mixtral_8x7b": ("mixtral_8x7b.json", "Mixtral-8x7B-v0.1", _deploy(1, 8, **SERVE)),
    "qwen3_30b_a3b": ("qwen3_30b_a3b.json", "Qwen3-30B-A3B", _deploy(1, 8)),
    "deepseek_v3": ("deepseek_v3.json", "DeepSeek-V3 (671B)", _deploy(8, 8, **SERVE)),
    "olmoe_1b_7b": ("olmoe_1b_7b.json", "OLMoE-1B-7B-0924", _deploy(1, 8)),
    "gpt_oss_20b": ("gpt_oss_20b.json", "gpt-oss-20b", _deploy(1, 4, **SERVE)),
    "switch_base_128": ("switch_base_128.json", "switch-base-128", _deploy(1, 8, gpu="a100")),
    "qwen1_5_moe_a2_7b": ("qwen1_5_moe_a2_7b.json", "Qwen1.5-MoE-A2.7B", _deploy(1, 4)),
    "qwen2_57b_a14b": ("qwen2_57b_a14b.json", "Qwen2-57B-A14B", _deploy(1, 8, **SERVE)),
    "deepseek_v2_lite": ("deepseek_v2_lite.json", "DeepSeek-V2-Lite", _deploy(1, 8)),
    "deepseek_v2": ("deepseek_v2.json", "DeepSeek-V2 (236B)", _deploy(4, 8, **SERVE)),
    "dbrx": ("dbrx.json", "DBRX (132B)", _deploy(2, 8, tp=2, ep=16, **SERVE)),
    "llama4_scout": ("llama4_scout.json", "Llama-4-Scout-17B-16E", _deploy(1, 8, **SERVE)),
    "glm45_air": ("glm45_air.json", "GLM-4.5-Air", _deploy(2, 8, gpu="h200")),
}


def real_yaml(name: str) -> str:
    file, title, deployment = REAL_MODELS[name]
    config = json.loads((CONFIGS / file).read_text())
    data = {**import_hf_config(config, name=name), **deployment}
    header = (
        f"{title}: the MoE layer, imported from its Hugging Face config.json.\n"
        f"Source: tests/data/hf_configs/{file}\n"
        "Regenerate: pytest tests/test_hf_import.py --update-golden"
    )
    return dump_spec_yaml(data, header)


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_model_spec_is_golden(name, request):
    path = ROOT / "specs" / f"{name}.yaml"
    text = real_yaml(name)
    update = request.config.getoption("--update-golden", default=False)
    if update or os.environ.get("MOEC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; create it with --update-golden"
    assert (
        path.read_text() == text
    ), f"{path} is stale: pytest tests/test_hf_import.py --update-golden"
    spec, _ = load_spec(path)
    assert spec.name == name


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_yaml_round_trip_is_stable(name):
    """dump -> load -> dump gives the same bytes, and the YAML means the same spec as the data."""
    file, _, deployment = REAL_MODELS[name]
    data = {**import_hf_config(json.loads((CONFIGS / file).read_text()), name=name), **deployment}
    text = dump_spec_yaml(data, "header")
    spec, _ = load_spec_text(text)
    assert spec == parse_spec(data, SourceMap("<data>"))
    assert dump_spec_yaml(spec.model_dump(mode="json"), "header") == text


def _spec(config: dict, **kw):
    return parse_spec(import_hf_config(config, **kw), SourceMap("<t>"))


def _real(file: str) -> dict:
    return json.loads((CONFIGS / file).read_text())


def test_real_model_semantics():
    mixtral = _spec(_real("mixtral_8x7b.json"))
    assert mixtral.router.normalize.kind == "sum" and mixtral.router.top_k == 2
    assert mixtral.balance.aux_loss == 0.02 and mixtral.layers.count == 32

    v3 = _spec(_real("deepseek_v3.json"))
    r = v3.router
    assert (r.score, r.selection_bias, r.scale, r.top_k) == ("sigmoid", "scores", 2.5, 8)
    assert (r.normalize.kind, r.normalize.eps) == ("sum", 1e-20)
    assert (r.groups.count, r.groups.keep, r.groups.score, r.groups.masked) == (
        8,
        4,
        "top2_sum",
        "-inf",
    )
    assert v3.shared.ffn == 2048 and v3.shared.gate is None
    assert (v3.layers.count, v3.layers.first, v3.layers.every) == (61, 3, 1)
    assert v3.balance.seq_aux_loss == 0.001 and v3.balance.aux_loss == 0

    v2 = _spec(_real("deepseek_v2.json"))
    assert v2.router.normalize.kind == "none" and v2.router.scale == 16.0
    g = v2.router.groups
    assert (g.count, g.keep, g.score, g.masked, g.weights_from) == (8, 3, "max", "0", "masked")
    assert v2.shared.ffn == 2 * 1536

    oss = _spec(_real("gpt_oss_20b.json"))
    e = oss.experts[0]
    assert (e.glu, e.limit, e.alpha, e.bias, e.count, e.ffn) == (
        "gpt_oss",
        7.0,
        1.702,
        True,
        32,
        2880,
    )
    assert oss.router.linear_bias and oss.router.topk_on == "logits" and oss.router.top_k == 4
    assert oss.checkpoint.layout == "gpt_oss"

    switch = _spec(_real("switch_base_128.json"))
    assert switch.router.kind == "switch" and switch.router.top_k == 1
    assert (switch.capacity.tokens, switch.capacity.scope, switch.capacity.drop) == (
        64,
        "sequence",
        "position",
    )
    assert switch.experts[0].kind == "mlp" and switch.experts[0].activation == "relu"
    assert (switch.balance.aux_loss_type, switch.balance.z_loss) == ("switch", 0.001)
    assert (switch.layers.count, switch.layers.first, switch.layers.every) == (12, 1, 2)
    assert switch.dtype == "fp32" and switch.hidden == 768

    scout = _spec(_real("llama4_scout.json"))  # the MoE lives in text_config
    assert scout.weight_on == "input" and scout.router.score == "sigmoid"
    assert scout.router.topk_on == "logits" and scout.router.normalize.kind == "none"
    assert scout.hidden == 5120 and scout.shared.ffn == 8192 and scout.experts[0].count == 16

    dbrx = _spec(_real("dbrx.json"))  # ffn_config nested; hidden from d_model
    assert dbrx.hidden == 6144 and dbrx.experts[0].ffn == 10752 and dbrx.router.top_k == 4
    assert (dbrx.router.normalize.kind, dbrx.router.normalize.p) == ("pnorm", 1.0)
    assert dbrx.balance.aux_loss == 0.05

    qwen2 = _spec(_real("qwen2_57b_a14b.json"))
    assert qwen2.shared.gate == "sigmoid_linear" and qwen2.shared.ffn == 20480
    assert qwen2.router.normalize.kind == "none"


@pytest.mark.parametrize("file", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_hub_spelling_and_to_dict_agree(file):
    """A hub config.json and transformers' ``Config(**it).to_dict()`` import to the same MoE layer."""
    transformers = pytest.importorskip("transformers")
    raw = _real(file)
    cfg = transformers.AutoConfig.for_model(**raw)
    keep = ("hidden", "experts", "shared", "router", "weight_on", "routed_scale", "capacity")
    keep += ("balance", "layers", "checkpoint", "zero_experts", "latent", "output_bias")

    def moe(data):
        data = {k: v for k, v in data.items() if k in keep}
        data["experts"] = [{k: v for k, v in g.items() if k != "dtype"} for g in data["experts"]]
        if "shared" in data:
            data["shared"] = {k: v for k, v in data["shared"].items() if k != "dtype"}
        return data

    ours = moe(import_hf_config(raw))
    theirs = moe(import_hf_config(cfg.to_dict()))
    if raw["model_type"].startswith("deepseek"):  # aux_loss_alpha / seq_aux are not config fields
        ours.pop("balance", None)
        theirs.pop("balance", None)
    assert ours == theirs


def test_every_tiny_case_imports():
    pytest.importorskip("transformers")
    from tests.hf_cases import CASES

    for case in CASES:
        spec = _spec(case.make_config().to_dict(), name=case.id, layer=case.layer)
        assert spec.source.hf_model_type, case.id


# Model types whose transformers router computes F.linear(x, W) in the input dtype (no upcast before
# the GEMM; read from modeling_<type>.py). Every other supported type upcasts x and W to fp32
# (Switch: router_dtype, float32 by default).
INPUT_DTYPE_ROUTERS = {
    "mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_vl_moe",
    "qwen3_omni_moe", "qwen4_exp", "olmoe", "flex_olmo", "mellum", "jamba", "gpt_oss", "llama4",
    "granitemoe", "jetmoe", "dbrx", "phimoe", "cohere2_moe", "aria", "mistral4", "deepseek_v4",
    "minimax_m2", "minimax_m3_vl", "step3p7", "afmoe", "laguna", "lfm2_moe",
}  # fmt: skip


def test_router_dtype_follows_transformers():
    """``router.dtype`` is where transformers runs the router GEMM, for every tiny case (the bf16
    test in test_hf_equivalence.py checks one case per router family numerically)."""
    pytest.importorskip("transformers")
    from tests.hf_cases import CASES

    assert INPUT_DTYPE_ROUTERS <= set(SUPPORTED_MODEL_TYPES)
    for case in CASES:
        spec = _spec(case.make_config().to_dict(), name=case.id, layer=case.layer)
        expected = "input" if case.module in INPUT_DTYPE_ROUTERS else "fp32"
        assert spec.router.dtype == expected, case.id


def test_dump_writes_only_what_differs_from_defaults():
    text = real_yaml("mixtral_8x7b")
    assert text.startswith("# Mixtral-8x7B-v0.1")
    assert "# Imported from Hugging Face model_type 'mixtral' (MixtralSparseMoeBlock)." in text
    for absent in ("capacity:", "placement:", "comm:", "zero_experts", "latent", "weight_on"):
        assert absent not in text
    for present in ("name: mixtral_8x7b", "hidden: 4096", "experts:", "router:", "top_k: 2"):
        assert present in text
    keys = [line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha()]
    schema_order = [
        "name",
        "hidden",
        "experts",
        "router",
        "balance",
        "layers",
        "parallel",
        "cluster",
    ]
    assert keys == schema_order + ["workload", "source"]


# -- errors and refusals ------------------------------------------------------------------------


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(UsageError) as err:
        import_hf_config({"model_type": "llama", "hidden_size": 8})
    message = str(err.value)
    assert "'llama'" in message and "mixtral" in message and "switch_transformers" in message


@pytest.mark.parametrize("model_type", ["nllb_moe", "axk1", "gemma4", "granitemoeshared"])
def test_inexpressible_architectures_are_refused_with_the_reason(model_type):
    with pytest.raises(UsageError) as err:
        import_hf_config({"model_type": model_type, "hidden_size": 8})
    assert "cannot be expressed" in str(err.value) and model_type in str(err.value)


def test_supported_model_types_cover_the_required_architectures():
    required = {
        "mixtral", "minimax", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "deepseek_v2",
        "deepseek_v3", "glm4_moe", "dots1", "bailing_hybrid", "ernie4_5_moe", "hunyuan_v1_moe",
        "gpt_oss", "llama4", "dbrx", "granitemoe", "jetmoe", "phimoe", "switch_transformers",
    }  # fmt: skip
    assert required <= set(SUPPORTED_MODEL_TYPES)
    # clones of supported blocks (HF_MOE_SEMANTICS.md §3)
    clones = {"qwen3_omni_moe", "deepseek_ocr2", "unlimited_ocr", "dots3_note", "glm_moe_dsa"}
    assert clones <= set(SUPPORTED_MODEL_TYPES)


# The MoE of a multimodal model lives in a sub-config; the composite config imports the same layer.
TEXT = {"hidden_size": 40, "num_hidden_layers": 3, "moe_intermediate_size": 24}
OCR = {**TEXT, "n_routed_experts": 8}
OCR2 = {**OCR, "num_experts_per_tok": 3, "mlp_layer_types": ["dense", "sparse", "sparse"]}
DOTS3 = {**OCR, "shared_experts_intermediate_size": 20, "n_shared_experts": 2}
THINKER = {**TEXT, "num_experts": 8, "num_experts_per_tok": 3}
TALKER = {**THINKER, "shared_expert_intermediate_size": 20, "mlp_only_layers": [0]}


@pytest.mark.parametrize(
    "composite,sub,sub_type",
    [
        ({"model_type": "deepseek_ocr2", "text_config": OCR2}, OCR2, "deepseek_ocr2_text"),
        # the Unlimited-OCR hub config calls its text part language_config
        ({"model_type": "unlimited_ocr", "language_config": OCR}, OCR, "unlimited_ocr_text"),
        ({"model_type": "dots3_note", "text_config": DOTS3}, DOTS3, "dots3_note_text"),
        ({"model_type": "dots3_note", **DOTS3}, DOTS3, "dots3_note_text"),  # flat, as on the hub
        # Qwen3-Omni: the thinker's MoE (the talker's is its own model type, below)
        ({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": THINKER},
          "talker_config": {"text_config": TALKER}}, THINKER, "qwen3_omni_moe_text"),
        ({"model_type": "qwen3_omni_moe_thinker", "text_config": THINKER}, THINKER,
         "qwen3_omni_moe_text"),
    ],
)  # fmt: skip
def test_composite_configs_import_their_moe(composite, sub, sub_type):
    def moe(data: dict) -> dict:
        return {k: v for k, v in data.items() if k not in ("name", "source")}

    alone = import_hf_config({**sub, "model_type": sub_type})
    assert moe(import_hf_config(composite)) == moe(alone)


def test_clone_details():
    dots3 = {**DOTS3, "model_type": "dots3_note", "num_hidden_layers": 6, "moe_layer_freq": 2}
    dots3 = _spec(dots3)
    assert dots3.shared.ffn == 2 * 20 and dots3.router.selection_bias == "scores"
    assert (dots3.layers.first, dots3.layers.every) == (2, 2)  # first_k_dense_replace default 1
    ocr = _spec({**OCR, "model_type": "unlimited_ocr_text"})
    assert ocr.router.top_k == 6 and ocr.layers.first == 1 and ocr.router.normalize.kind == "none"
    with pytest.raises(UsageError, match="'mlp_layer_types'"):  # transformers needs it too
        import_hf_config({**OCR, "model_type": "deepseek_ocr2_text", "num_experts_per_tok": 2})
    talker = _spec({**TALKER, "model_type": "qwen3_omni_moe_talker_text"})
    assert talker.shared.gate == "sigmoid_linear" and talker.router.normalize.kind == "none"
    assert talker.layers.first == 0  # the talker's decoder layers are all MoE
    thinker = _spec({"model_type": "qwen3_omni_moe", "thinker_config": {"text_config": THINKER}})
    assert "talker_config.text_config" in thinker.source.note and thinker.shared is None


LAYERS = {"num_hidden_layers": 2}


@pytest.mark.parametrize(
    "config,needle",
    [
        ([], "JSON object"),
        ({"hidden_size": 8}, "'model_type'"),
        ({**LAYERS, "model_type": "mixtral", "intermediate_size": 8, "num_local_experts": 4},
         "'hidden_size'"),
        ({**LAYERS, "model_type": "mixtral", "hidden_size": 8, "num_local_experts": 4},
         "'intermediate_size'"),
        ({"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8, "num_local_experts": 4},
         "'num_hidden_layers'"),
        (
            {**LAYERS, "model_type": "qwen3_moe", "hidden_size": 8, "moe_intermediate_size": 8},
            "'num_experts' or 'num_local_experts'",
        ),
        ({"model_type": "dbrx", "d_model": 8, "ffn_config": {"moe_num_experts": 4}}, "'ffn_hidden_size'"),
    ],
)  # fmt: skip
def test_missing_keys_are_named(config, needle):
    with pytest.raises(UsageError) as err:
        import_hf_config(config)
    assert needle in str(err.value)


MIX = {"model_type": "mixtral", "hidden_size": 8, "intermediate_size": 8, "num_local_experts": 4}
MIX["num_hidden_layers"] = 4
V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 8,
    "moe_intermediate_size": 8,
    "n_routed_experts": 16,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
}


@pytest.mark.parametrize(
    "config,kw,needle",
    [
        ({**V3, "model_type": "deepseek_v2", "topk_method": "noaux_tc", "num_experts_per_tok": 2}, {},
         "topk_method 'noaux_tc'"),
        ({**MIX, "model_type": "phimoe", "router_jitter_noise": 0.0}, {}, "router_jitter_noise"),
        ({**MIX, "hidden_act": "quick_gelu"}, {}, "activation 'quick_gelu'"),
        ({**MIX, "model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 8,
          "num_experts_per_tok": 2, "mlp_only_layers": [2]}, {}, "not every N-th layer"),
        ({**MIX, "model_type": "hunyuan_v1_moe", "num_experts": 4, "moe_topk": [1, 2, 1, 2]}, {},
         "differs per layer"),
        (V3, {"layer": 0}, "layer 0 is a dense layer"),
        ({**MIX, "model_type": "laguna", "num_experts": 4, "moe_intermediate_size": 8,
          "moe_apply_router_weight_on_input": True}, {}, "moe_apply_router_weight_on_input"),
        ({**V3, "model_type": "deepseek_v4", "n_routed_experts": 4}, {"layer": 1}, "hash-routed"),
        ({**MIX, "model_type": "cohere2_moe", "num_experts": 4, "expert_selection_fn": "relu"}, {},
         "expert_selection_fn"),
        ({**V3, "n_routed_experts": 12, "n_group": 5}, {}, "does not make a valid spec"),
    ],
)  # fmt: skip
def test_refusals_say_what_is_missing(config, kw, needle):
    with pytest.raises(UsageError) as err:
        import_hf_config(config, **kw)
    assert needle in str(err.value), str(err.value)


def test_per_layer_values_take_the_layer_argument():
    config = {**MIX, "model_type": "hunyuan_v1_moe", "num_experts": [4, 8, 8, 8]}
    config["moe_topk"] = [1, 2, 3, 2]
    spec = _spec(config, layer=2)
    assert spec.num_experts == 8 and spec.router.top_k == 3
    assert "decoder layer 2" in spec.source.note


def test_traps():
    # DeepSeek-V2 ignores norm_topk_prob; Mixtral always renormalises
    v2 = {**V3, "model_type": "deepseek_v2", "num_experts_per_tok": 2, "norm_topk_prob": True}
    assert _spec(v2).router.normalize.kind == "none"
    assert _spec({**MIX, "norm_topk_prob": False}).router.normalize.kind == "sum"
    # PhiMoE is always top-2 sparsemixer with eps = router_jitter_noise; its aux loss counts
    # num_experts_per_tok slots
    phi = _spec(
        {**MIX, "model_type": "phimoe", "num_experts_per_tok": 4, "router_jitter_noise": 0.5}
    )
    assert (phi.router.kind, phi.router.top_k, phi.router.sparsemixer_eps) == (
        "sparsemixer",
        2,
        0.5,
    )
    assert phi.balance.aux_loss_top_k == 4
    assert _spec({**MIX, "model_type": "phimoe"}).balance.aux_loss_top_k is None
    # Ernie: bias on the probabilities, renorm clamp_min
    ernie = _spec({"model_type": "ernie4_5_moe", "hidden_size": 8, "moe_intermediate_size": 8,
                   "moe_num_experts": 4, "moe_k": 2, "num_hidden_layers": 3})  # fmt: skip
    assert ernie.router.selection_bias == "scores" and ernie.router.normalize.clamp_min == 1e-12
    assert ernie.checkpoint.layout == "ernie" and ernie.shared.ffn == 16
    assert (ernie.layers.first, ernie.layers.every) == (1, 1)
    # DBRX moe_normalize_expert_weights = null: no renormalisation
    dbrx = {"model_type": "dbrx", "d_model": 8, "n_layers": 2}
    dbrx["ffn_config"] = {
        "ffn_hidden_size": 8,
        "moe_num_experts": 4,
        "moe_normalize_expert_weights": None,
    }
    assert _spec(dbrx).router.normalize.kind == "none"
    # Kolibri: the bias goes on the logits; LFM2: experts are SiLU whatever hidden_act says
    kolibri = {**MIX, "model_type": "kolibri1", "num_experts": 8, "moe_intermediate_size": 8}
    assert _spec(kolibri).router.selection_bias == "logits"
    lfm2 = {**MIX, "model_type": "lfm2_moe", "num_experts": 4, "moe_intermediate_size": 8}
    assert _spec({**lfm2, "hidden_act": "gelu"}).experts[0].activation == "silu"
    # Step-3.7: num_local_experts is not the expert count (n_routed_experts is)
    step = {"model_type": "step3p7", "text_config": {"model_type": "step3p5", "hidden_size": 8,
            "moe_intermediate_size": 8, "num_local_experts": 99, "n_routed_experts": 12,
            "num_hidden_layers": 5}}  # fmt: skip
    s = _spec(step)
    assert s.num_experts == 12 and (s.layers.first, s.layers.count) == (3, 5)


@pytest.mark.parametrize(
    "config,settings",
    [
        (MIX, []),
        ({**MIX, "router_jitter_noise": 0.1}, ["router_jitter_noise=0.1"]),
        ({**MIX, "model_type": "phimoe"}, ["Gumbel"]),  # the sparsemixer samples in train()
        ({**MIX, "model_type": "phimoe", "input_jitter_noise": 0.2}, ["Gumbel", "input_jitter_noise=0.2"]),
        ({"model_type": "dbrx", "d_model": 8, "n_layers": 2,
          "ffn_config": {"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_jitter_eps": 0.01}},
         ["ffn_config.moe_jitter_eps=0.01"]),
        (_real("switch_base_128.json"), ["router_jitter_noise=0.01", "dropout_rate=0.1"]),
        ({**_real("switch_base_128.json"), "router_jitter_noise": 0, "dropout_rate": 0.0}, []),
    ],
)  # fmt: skip
def test_training_only_randomness_is_noted(config, settings):
    """Router jitter, expert dropout and PhiMoE's sampled sparsemixer run only in train(): each
    gets a note (eval-mode outputs match; the noise is left out), not an error."""
    notes = training_only_notes(config)
    assert len(notes) == len(settings), notes
    for note, setting in zip(notes, settings, strict=True):
        assert setting in note and "eval-mode outputs match" in note
        assert "leaves this train-mode noise out" in note
    import_hf_config(config)  # and the import itself goes through


def test_importer_does_not_import_torch_or_transformers():
    code = (
        "import sys, json; from moec.importers import import_hf_config, dump_spec_yaml\n"
        f"d = import_hf_config(json.load(open({str(CONFIGS / 'deepseek_v3.json')!r})))\n"
        "dump_spec_yaml(d, 'x')\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_cli_import_hf(tmp_path, capsys):
    """``moec import-hf`` writes what dump_spec_yaml makes; a refused config exits 2 with the reason."""
    from moec.cli import main

    out = tmp_path / "v3.yaml"
    assert (
        main(["import-hf", str(CONFIGS / "deepseek_v3.json"), "-o", str(out), "--name", "v3"]) == 0
    )
    spec, _ = load_spec(out)
    assert spec.name == "v3" and spec.router.groups.count == 8
    assert "note:" not in capsys.readouterr().err  # nothing training-only in DeepSeek-V3
    switch = tmp_path / "switch.yaml"
    assert main(["import-hf", str(CONFIGS / "switch_base_128.json"), "-o", str(switch)]) == 0
    err = capsys.readouterr().err
    assert err.count("note: switch_transformers:") == 2 and "error" not in err
    bad = tmp_path / "nllb.json"
    bad.write_text(json.dumps({"model_type": "nllb_moe", "d_model": 8}))
    assert main(["import-hf", str(bad)]) == 2
    assert "cannot be expressed" in capsys.readouterr().err
