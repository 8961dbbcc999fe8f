"""Where each tensor of a Hugging Face checkpoint lives, per checkpoint layout.

The generated ``weights.py`` receives a literal table: canonical tensor name → candidate sources, tried in
order. A source is ``{"key": str, "stack": bool, "ops": [...]}``: ``key`` may contain ``{e}`` (one key per
expert, stacked on dim 0 when ``stack``), and ``ops`` reshape the tensor into the canonical nn.Linear
layout (HF_MOE_SEMANTICS.md §4): ``["chunk", dim, n, i]``, ``["stride", dim, step, start]``,
``["transpose", d0, d1]``, ``["reshape", shape]``, ``["narrow", dim, start, length]``.

Canonical names and shapes:
    router.weight [E+Z, H]    router.bias [E+Z]    router.selection_bias [E+Z]
    experts.w_gate / experts.w_up [E, F, Hin]    experts.w_down [E, Hin, F]
    experts.b_gate / experts.b_up [E, F]         experts.b_down [E, Hin]
    latent.w_in [L, H]  latent.b_in [L]  latent.w_out [H, L]  latent.b_out [H]
    shared.w_gate / shared.w_up [Fs, H]  shared.w_down [H, Fs]  shared.b_*  shared.score_gate [1, H]
    output_bias [H]
(Hin is H, or the latent dim L when the experts run in a latent space.)
"""

from __future__ import annotations

from moec.spec.schema import Spec

Source = dict
Table = dict[str, list[Source]]


def src(key: str, *ops: list, stack: bool = False) -> Source:
    return {"key": key, "stack": stack, "ops": [list(op) for op in ops]}


def _per_expert(names: tuple[str, str, str]) -> dict[str, Source]:
    """The hub layout with one nn.Linear per expert, e.g. experts.{e}.w1/w3/w2."""
    gate, up, down = names
    return {
        "experts.w_gate": src(f"experts.{{e}}.{gate}.weight", stack=True),
        "experts.w_up": src(f"experts.{{e}}.{up}.weight", stack=True),
        "experts.w_down": src(f"experts.{{e}}.{down}.weight", stack=True),
        "experts.b_gate": src(f"experts.{{e}}.{gate}.bias", stack=True),
        "experts.b_up": src(f"experts.{{e}}.{up}.bias", stack=True),
        "experts.b_down": src(f"experts.{{e}}.{down}.bias", stack=True),
    }


def _fused_experts(glu: bool) -> Table:
    """transformers ≥5 module layout: gate_up_proj [E, 2F, H] (gate rows first), down_proj [E, H, F]."""
    if not glu:
        return {
            "experts.w_up": [src("experts.up_proj")],
            "experts.w_down": [src("experts.down_proj")],
            "experts.b_up": [src("experts.up_proj_bias")],
            "experts.b_down": [src("experts.down_proj_bias")],
        }
    table: Table = {
        "experts.w_gate": [src("experts.gate_up_proj", ["chunk", 1, 2, 0])],
        "experts.w_up": [src("experts.gate_up_proj", ["chunk", 1, 2, 1])],
        "experts.w_down": [src("experts.down_proj")],
        "experts.b_gate": [src("experts.gate_up_proj_bias", ["chunk", 1, 2, 0])],
        "experts.b_up": [src("experts.gate_up_proj_bias", ["chunk", 1, 2, 1])],
        "experts.b_down": [src("experts.down_proj_bias")],
    }
    for names in (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")):
        for name, source in _per_expert(names).items():
            table[name].append(source)
    return table


def _gpt_oss() -> Table:
    """gpt-oss: x@W layout [E, H, 2F] with gate/up interleaved in the columns (gate = even)."""
    return {
        "experts.w_gate": [src("experts.gate_up_proj", ["stride", 2, 2, 0], ["transpose", 1, 2])],
        "experts.w_up": [src("experts.gate_up_proj", ["stride", 2, 2, 1], ["transpose", 1, 2])],
        "experts.w_down": [src("experts.down_proj", ["transpose", 1, 2])],
        "experts.b_gate": [src("experts.gate_up_proj_bias", ["stride", 1, 2, 0])],
        "experts.b_up": [src("experts.gate_up_proj_bias", ["stride", 1, 2, 1])],
        "experts.b_down": [src("experts.down_proj_bias")],
    }


def _xw_halves() -> Table:
    """Llama 4 / Aria: x@W layout [E, H, 2F] with gate = the first half of the columns."""
    return {
        "experts.w_gate": [src("experts.gate_up_proj", ["chunk", 2, 2, 0], ["transpose", 1, 2])],
        "experts.w_up": [src("experts.gate_up_proj", ["chunk", 2, 2, 1], ["transpose", 1, 2])],
        "experts.w_down": [src("experts.down_proj", ["transpose", 1, 2])],
        "experts.b_gate": [src("experts.gate_up_proj_bias", ["chunk", 1, 2, 0])],
        "experts.b_up": [src("experts.gate_up_proj_bias", ["chunk", 1, 2, 1])],
        "experts.b_down": [src("experts.down_proj_bias")],
    }


def _dbrx(spec: Spec) -> Table:
    """DBRX: w1 (gate), v1 (up), w2 (down) each [E*F, H]; w2 is used as a @ w2_e (transposed)."""
    e, f, h = spec.num_experts, spec.experts[0].ffn, spec.hidden
    return {
        "experts.w_gate": [src("experts.mlp.w1", ["reshape", [e, f, h]])],
        "experts.w_up": [src("experts.mlp.v1", ["reshape", [e, f, h]])],
        "experts.w_down": [src("experts.mlp.w2", ["reshape", [e, f, h]], ["transpose", 1, 2])],
    }


def _jetmoe() -> Table:
    return {
        "experts.w_gate": [src("input_linear.weight", ["chunk", 1, 2, 0])],
        "experts.w_up": [src("input_linear.weight", ["chunk", 1, 2, 1])],
        "experts.w_down": [src("output_linear.weight")],
    }


def _switch() -> Table:
    return {
        "experts.w_up": [src("experts.expert_{e}.wi.weight", stack=True)],
        "experts.w_down": [src("experts.expert_{e}.wo.weight", stack=True)],
    }


ROUTER_KEYS = {
    "hf_fused": "gate",
    "gpt_oss": "router",
    "llama4": "router",
    "dbrx": "router.layer",
    "jetmoe": "router.layer",
    "granite": "router",
    "switch": "router.classifier",
    "hunyuan": "gate.wg",
    "ernie": "gate",
}

SHARED_KEYS = {"hf_fused": "shared_experts", "llama4": "shared_expert", "hunyuan": "shared_mlp"}

BIAS_KEYS = {"ernie": "gate.moe_statics.e_score_correction_bias"}


# Hub-checkpoint spellings (transformers' conversion_mapping.py) tried after the layout's own key:
# PhiMoE and Granite hubs name the router differently from the 5.23 module; Bailing, Ernie and
# EXAONE store the selection bias under other names.
HUB_ROUTER_KEYS = ["gate", "router", "router.layer"]
HUB_BIAS_KEYS = [
    "gate.e_score_correction_bias",
    "gate.expert_bias",
    "e_score_correction_bias",
    "moe_statics.e_score_correction_bias",
]


def _unique(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


def checkpoint_table(spec: Spec) -> Table:
    """Canonical tensor name → candidate sources, for every tensor this spec's layer has."""
    ck = spec.checkpoint
    layout = ck.layout
    glu = spec.experts[0].kind == "glu"
    experts = {
        "gpt_oss": _gpt_oss,
        "llama4": _xw_halves,
        "dbrx": lambda: _dbrx(spec),
        "jetmoe": _jetmoe,
        "switch": _switch,
    }.get(layout, lambda: _fused_experts(glu))()
    router = ck.router_key or ROUTER_KEYS[layout]
    routers = _unique([router] + (HUB_ROUTER_KEYS if ck.router_key is None else []))
    table: Table = {f"router.{w}": [src(f"{r}.{w}") for r in routers] for w in ("weight", "bias")}
    bias_key = ck.bias_key or BIAS_KEYS.get(layout, "gate.e_score_correction_bias")
    biases = _unique([bias_key] + (HUB_BIAS_KEYS if ck.bias_key is None else []))
    table["router.selection_bias"] = [src(b, ["reshape", [-1]]) for b in biases]
    table.update({k: v if isinstance(v, list) else [v] for k, v in experts.items()})
    if layout in ("hf_fused", "granite") and glu:  # Granite hubs: already fused, other names
        for i, name in enumerate(("w_gate", "w_up")):
            table[f"experts.{name}"].append(src("input_linear.weight", ["chunk", 1, 2, i]))
        table["experts.w_down"].append(src("output_linear.weight"))
    shared = ck.shared_key or SHARED_KEYS.get(layout, "shared_experts")
    for name, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        table[f"shared.w_{name}"] = [src(f"{shared}.{proj}.weight")]
        table[f"shared.b_{name}"] = [src(f"{shared}.{proj}.bias")]
    for i, name in enumerate(("gate", "up")):  # a fused gate_up_proj Linear [2Fs, H] (MiniMax-M3)
        table[f"shared.w_{name}"].append(src(f"{shared}.gate_up_proj.weight", ["chunk", 0, 2, i]))
    table["shared.score_gate"] = [src("shared_expert_gate.weight")]
    table["latent.w_in"] = [src("fc1_latent_proj.weight")]
    table["latent.b_in"] = [src("fc1_latent_proj.bias")]
    table["latent.w_out"] = [src("fc2_latent_proj.weight")]
    table["latent.b_out"] = [src("fc2_latent_proj.bias")]
    table["output_bias"] = [src("bias")]
    return table
