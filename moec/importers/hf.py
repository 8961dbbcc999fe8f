"""Import the MoE layer of a Hugging Face ``config.json`` as moec spec data, and write it as YAML.

    data = import_hf_config(json.load(open("config.json")), name="mixtral_8x7b")
    text = dump_spec_yaml(data, "Mixtral-8x7B-v0.1")

Plain JSON in, plain spec data out: this module never imports torch or transformers. The semantics of
every architecture follow transformers 5.23's modeling code; one builder per architecture lives in
``hf_softmax`` (softmax over all experts), ``hf_logits`` (top-k on logits, DBRX, PhiMoE, Switch),
``hf_sigmoid`` (the DeepSeek-V3 router family) and ``hf_biased`` (sigmoid + selection bias, no groups).
An architecture or a setting the spec vocabulary cannot express is refused with a ``UsageError`` that
says what is missing, rather than imported with different semantics.
"""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml
from pydantic import BaseModel

from moec.errors import SpecError, UsageError
from moec.importers import hf_biased, hf_logits, hf_sigmoid, hf_softmax
from moec.importers.hf_config import DTYPES, HFConfig
from moec.spec import SourceMap, parse_spec
from moec.spec.schema import Spec

# model_type -> builder (config -> the MoE fields of the spec)
ARCHS = {
    "mixtral": hf_softmax.mixtral,
    "minimax": hf_softmax.mixtral,
    "hunyuan_v1_moe": hf_softmax.hunyuan_v1_moe,
    "qwen2_moe": hf_softmax.qwen2_moe,
    "qwen3_moe": hf_softmax.qwen3_moe,
    "qwen3_next": hf_softmax.qwen3_next,
    "qwen3_5_moe": hf_softmax.qwen3_5_moe,
    "qwen3_vl_moe": hf_softmax.qwen3_vl_moe,
    "qwen3_omni_moe": hf_softmax.qwen3_omni_moe,
    "qwen3_omni_moe_talker_text": hf_softmax.qwen3_omni_moe_talker,
    "qwen4_exp": hf_softmax.qwen4_exp,
    "olmoe": hf_softmax.olmoe,
    "flex_olmo": hf_softmax.olmoe,
    "mellum": hf_softmax.mellum,
    "jamba": hf_softmax.jamba,
    "ernie4_5_moe": hf_softmax.ernie4_5_moe,
    "deepseek_v2": hf_softmax.deepseek_v2,
    "deepseek_ocr2": hf_softmax.deepseek_ocr,
    "unlimited_ocr": hf_softmax.deepseek_ocr,
    "gpt_oss": hf_logits.gpt_oss,
    "llama4": hf_logits.llama4,
    "granitemoe": hf_logits.granitemoe,
    "jetmoe": hf_logits.jetmoe,
    "dbrx": hf_logits.dbrx,
    "phimoe": hf_logits.phimoe,
    "switch_transformers": hf_logits.switch_transformers,
    "cohere2_moe": hf_logits.cohere2_moe,
    "aria": hf_logits.aria,
    "openai_privacy_filter": hf_logits.openai_privacy_filter,
    **{name: hf_sigmoid.v3_family for name in hf_sigmoid.V3_ARCHS},
    "nemotron_h": hf_sigmoid.nemotron_h,
    "beam": hf_sigmoid.beam,
    "deepseek_v4": hf_sigmoid.deepseek_v4,
    "inkling2": hf_sigmoid.inkling2,
    "minimax_m2": hf_biased.minimax_m2,
    "minimax_m3_vl": hf_biased.minimax_m3_vl,
    "step3p7": hf_biased.step3p7,
    "afmoe": hf_biased.afmoe,
    "hy_v3": hf_biased.hy_v3,
    "laguna": hf_biased.laguna,
    "lfm2_moe": hf_biased.lfm2_moe,
    "kolibri1": hf_biased.kolibri1,
    "flint": hf_biased.flint,
    "longcat_flash": hf_biased.longcat_flash,
}
# Multimodal / composite configs whose MoE lives in a sub-config: the keys that lead to it, each step
# a tuple of spellings. A step whose key is absent is skipped, so the sub-config's own JSON imports too.
TEXT = ("text_config",)
NESTED = {
    **dict.fromkeys(("llama4", "qwen3_5_moe", "glm5_next", "minimax_m3_vl", "step3p7", "inkling2", "aria",
                     "mistral_large4", "qwen3_vl_moe", "glm4v_moe", "qwen4_exp", "deepseek_ocr2",
                     "dots3_note"), (TEXT,)),
    "unlimited_ocr": (("text_config", "language_config"),),  # the hub config says language_config
    # the thinker (the language model); the talker's MoE imports from talker_config.text_config
    "qwen3_omni_moe": (("thinker_config",), TEXT),
}  # fmt: skip
# Sub-config model types (``text_config.model_type``) that name a supported architecture.
ALIASES = {
    "llama4_text": "llama4",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "glm5_next_text": "glm5_next",
    "minimax_m3_vl_text": "minimax_m3_vl",
    "step3p5": "step3p7",
    "inkling2_text": "inkling2",
    "aria_text": "aria",
    "mistral_large4_text": "mistral_large4",
    "qwen3_vl_moe_text": "qwen3_vl_moe",
    "glm4v_moe_text": "glm4v_moe",
    "qwen4_exp_text": "qwen4_exp",
    "deepseek_ocr2_text": "deepseek_ocr2",
    "unlimited_ocr_text": "unlimited_ocr",
    "dots3_note_text": "dots3_note",
    "qwen3_omni_moe_thinker": "qwen3_omni_moe",
    "qwen3_omni_moe_text": "qwen3_omni_moe",
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ARCHS))

# MoE model types of transformers 5.23 that no spec can describe faithfully, and what is missing.
REFUSED = {
    "axk1": "an RMSNorm on the block output (post_mlp_layernorm moved into the MoE block)",
    "nllb_moe": "fairseq top-2 routing with a sampled second expert and batch-prioritised capacity; "
    "transformers 5.23's NllbMoeExperts also dispatches by the 0/1 top-1 mask instead of expert ids, "
    "so it is no oracle",
    "gemma4": "the MoE runs inside the decoder layer beside the dense MLP; its router reads an "
    "un-scaled RMSNorm of the residual and multiplies by per_expert_scale[idx]",
    "diffusion_gemma": "the Gemma-4 MoE (router on a normed residual, per_expert_scale, post-norms)",
    "muse_spark": "experts in a projected space with centred RMSNorms before and after the experts",
    "zaya": "an MLP router over E+1 classes whose state is carried across layers",
    "doge": "product-key retrieval of single-neuron experts",
    "inkling": "routing weights normalised jointly over the k routed and the shared experts (gammas)",
    "granitemoeshared": "the shared MLP sits in the decoder layer as fused input_linear/output_linear",
    "granitemoehybrid": "the shared MLP sits in the decoder layer as fused input_linear/output_linear",
    "ernie4_5_vl_moe": "text/vision MoE blocks picked per token by modality ids "
    "(import the text block's config as ernie4_5_moe)",
    "vitpose_backbone": "experts picked by a dataset index, not by a learned router",
    "granite_docling": "a density router picks a connector, not learned token routing",
}

# What transformers' blocks do only in train(), which the generated layer leaves out (it computes the
# eval-mode output): model type -> (config key, its default, what train() does); key None = always.
JITTER = "multiplies the MoE input by U(1 - eps, 1 + eps)"
TRAINING_ONLY = {
    "mixtral": (("router_jitter_noise", 0.0, JITTER),),
    "minimax": (("router_jitter_noise", 0.0, JITTER),),
    "minimax_m2": (("router_jitter_noise", 0.0, JITTER),),
    "dbrx": (("ffn_config.moe_jitter_eps", None, JITTER),),
    "phimoe": (
        (None, None, "samples the sparsemixer's two experts with Gumbel noise"),
        ("input_jitter_noise", 0.0, JITTER),
    ),
    "switch_transformers": (
        ("router_jitter_noise", 0.01, "multiplies the router input by U(1 - eps, 1 + eps)"),
        ("dropout_rate", 0.1, "applies dropout inside every expert (expert dropout)"),
    ),
}

# Keys dump_spec_yaml always writes, defaults or not: what a reader looks for first.
ALWAYS = {"name", "hidden", "experts", "router"}
ALWAYS_NESTED = {"router": {"score", "top_k"}}


def import_hf_config(config: dict, name: str | None = None, layer: int | None = None) -> dict:
    """Spec data (what ``moec.spec.parse_spec`` accepts) for the MoE layer of an HF config dict.

    ``layer`` picks a decoder layer when the config varies per layer (lists of expert counts, top-k or
    clamp limits) and is checked to be an MoE layer. Raises ``UsageError`` for an unsupported
    ``model_type``, a missing required key, or an architecture the vocabulary cannot express.
    """
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise UsageError(f"layer must be a non-negative integer (got {layer!r})")
    model_type, arch, text = _locate(config)
    c = HFConfig(text, arch, layer)
    built = ARCHS[arch](c)

    hidden = built.pop("hidden", None) or c.int("hidden_size")
    block, note = built.pop("_block"), built.pop("_note", None)
    dtype = DTYPES.get(_first(text, config, "torch_dtype", "dtype"))
    if dtype is not None:
        built["experts"] = [{**g, "dtype": dtype} for g in built["experts"]]
        if built.get("shared"):
            built["shared"] = {**built["shared"], "dtype": dtype}
    quant = _first(text, config, "quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        method = quant["quant_method"]
        quant = f"hub weights are {method}-quantized: load_hf_state_dict wants dequantized tensors"
    else:
        quant = None
    at = f"decoder layer {layer}" if layer is not None else None
    notes = [n for n in (note, at, quant) if n]
    data: dict[str, Any] = {
        "name": name or _identifier(model_type),
        "hidden": hidden,
        "dtype": dtype,
        **built,
        "source": {
            "hf_model_type": model_type,
            "hf_block": block,
            "note": "; ".join(notes) or None,
        },
    }
    data = _ordered(_drop_none(data), Spec)
    try:
        parse_spec(data, SourceMap(f"<{model_type} config>"))
    except SpecError as exc:
        raise UsageError(f"the {model_type} config does not make a valid spec:\n{exc}") from None
    return data


def training_only_notes(config: dict) -> list[str]:
    """One line for each thing the config's transformers block does only in ``train()`` (router
    jitter, expert dropout, PhiMoE's sampled sparsemixer), which the generated layer leaves out."""
    model_type, arch, text = _locate(config)
    notes = []
    for key, default, what in TRAINING_ONLY.get(arch, ()):
        value = _dotted(text, key, default) if key else True
        if value:  # 0 and null switch it off
            setting = f"{key}={value}: " if key else ""
            notes.append(
                f"{model_type}: {setting}in train() only, transformers {what}; eval-mode outputs "
                "match, and the generated layer leaves this train-mode noise out"
            )
    return notes


def dump_spec_yaml(data: dict, header_comment: str) -> str:
    """Readable YAML for spec ``data``: schema key order, only values that differ from the defaults
    (plus name, hidden, experts and router), a comment header naming the source model type."""
    spec = parse_spec(data, SourceMap("<spec data>"))
    full = spec.model_dump(mode="json")
    for mlp in (*full["experts"], full["shared"] or {}):  # the layer's dtype is their default
        if mlp.get("dtype") == full["dtype"]:
            mlp["dtype"] = None
    if full["comm"]["wire_dtype"] == full["dtype"]:
        full["comm"]["wire_dtype"] = None
    body = _prune(Spec, full, ALWAYS)
    lines = [f"# {line}".rstrip() for line in header_comment.strip().splitlines()]
    if spec.source.hf_model_type:
        block = f" ({spec.source.hf_block})" if spec.source.hf_block else ""
        lines.append(
            f"# Imported from Hugging Face model_type {spec.source.hf_model_type!r}{block}."
        )
    text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(lines) + "\n" + text


# -- helpers ------------------------------------------------------------------------------------


def _locate(config: dict) -> tuple[str, str, dict]:
    """``(model_type, arch, the sub-config holding the MoE)`` of a config this importer supports."""
    if not isinstance(config, dict):
        raise UsageError(f"an HF config must be a JSON object (got {type(config).__name__})")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UsageError("HF config: missing required key 'model_type'")
    arch = ALIASES.get(model_type, model_type)
    if arch in REFUSED:
        raise UsageError(
            f"HF model_type {model_type!r} cannot be expressed as a moec spec: {REFUSED[arch]}"
        )
    if arch not in ARCHS:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise UsageError(
            f"HF model_type {model_type!r} is not supported by moec import-hf (supported: {supported})"
        )
    return model_type, arch, _sub_config(config, NESTED.get(arch, ()))


def _dotted(config: dict, path: str, default: Any) -> Any:
    for part in path.split("."):
        if not isinstance(config, dict) or config.get(part) is None:
            return default
        config = config[part]
    return config


def _sub_config(config: dict, path: tuple[tuple[str, ...], ...]) -> dict:
    """The sub-config at ``path`` (each step: the spellings of one key); absent steps are skipped."""
    for spellings in path:
        found = [config[k] for k in spellings if isinstance(config.get(k), dict)]
        config = found[0] if found else config
    return config


def _first(primary: dict, fallback: dict, *keys: str) -> Any:
    for source in (primary, fallback):
        for key in keys:
            if source.get(key) is not None:
                return source[key]
    return None


def _identifier(text: str) -> str:
    name = re.sub(r"\W+", "_", text).strip("_").lower() or "moe"
    return ("m_" + name if name[0].isdigit() else name)[:64]


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _model_of(annotation) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (``Router``, ``Shared | None``, ``tuple[X, ...]``)."""
    stack = [annotation]
    while stack:
        ann = stack.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        stack.extend(typing.get_args(ann))
    return None


def _ordered(data: dict, model: type[BaseModel]) -> dict:
    """``data`` with its keys in the schema's field order (nested models too)."""
    out = {}
    for name, field in model.model_fields.items():
        if name not in data:
            continue
        value, sub = data[name], _model_of(field.annotation)
        if sub is not None and isinstance(value, dict):
            value = _ordered(value, sub)
        elif sub is not None and isinstance(value, list):
            value = [_ordered(v, sub) if isinstance(v, dict) else v for v in value]
        out[name] = value
    out.update(
        {k: v for k, v in data.items() if k not in out}
    )  # unknown keys: parse_spec names them
    return out


def _default_json(field) -> Any:
    if field.is_required():
        return _MISSING
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return default.model_dump(mode="json")
    if isinstance(default, tuple):
        return list(default)
    return default


_MISSING = object()


def _prune(model: type[BaseModel], value: dict, keep: set[str]) -> dict:
    """Drop every field equal to its schema default, recursively; ``keep`` names fields to keep."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        v = value[name]
        if name not in keep and v == _default_json(field):
            continue
        sub = _model_of(field.annotation)
        if sub is not None and isinstance(v, dict):
            v = _prune(sub, v, ALWAYS_NESTED.get(name, set()) if keep else set())
            if sub.__name__ == "Normalize" and set(v) == {"kind"}:
                v = v["kind"]  # the shorthand `normalize: sum`
        elif sub is not None and isinstance(v, (list, tuple)):
            v = [_prune(sub, item, set()) if isinstance(item, dict) else item for item in v]
        out[name] = v
    return out


class _Dumper(yaml.SafeDumper):
    """Block style with list items indented under their key."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)
