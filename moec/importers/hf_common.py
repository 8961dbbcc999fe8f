"""Pieces the per-architecture builders share: expert groups, shared MLPs, renormalisation and the
ways configs say which decoder layers are MoE."""

from __future__ import annotations

from collections.abc import Callable

from moec.importers.hf_config import HFConfig

Builder = Callable[[HFConfig], dict]


def group(c: HFConfig, ffn: int, count: int, *, act: str | None = None, **extra) -> list[dict]:
    """One routed expert group (SwiGLU unless ``extra`` says otherwise)."""
    return [{"count": count, "ffn": ffn, "activation": act or c.act("hidden_act"), **extra}]


def shared(c: HFConfig, ffn: int, *, act: str | None = None, **extra) -> dict | None:
    if ffn <= 0:
        return None
    return {"ffn": ffn, "activation": act or c.act("hidden_act"), **extra}


def renorm(on: bool, eps: float = 0.0) -> dict:
    return {"kind": "sum", "eps": eps} if on else {"kind": "none"}


def default_kw(value) -> dict:
    """``default=value`` for ``HFConfig.get``, or nothing (the key is required) when value is None."""
    return {} if value is None else {"default": value}


def all_layers(c: HFConfig, *names: str) -> dict:
    count = c.int(*names)
    return c.layers(list(range(count)), count, "every layer is MoE")


def dense_prefix(c: HFConfig, default: int) -> dict:
    """DeepSeek-style: layers >= first_k_dense_replace are MoE (HF ignores moe_layer_freq)."""
    k = c.int("first_k_dense_replace", default=default)
    count = c.int("num_hidden_layers")
    return c.layers_where(count, lambda i: i >= k, f"first_k_dense_replace={k}")


def qwen_layers(c: HFConfig, dense_default: tuple[int, ...] = ()) -> dict:
    """Qwen2/3-MoE: MoE iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step = c.int("decoder_sparse_step", default=1)
    dense = set(c.get("mlp_only_layers", default=list(dense_default)))
    why = f"decoder_sparse_step={step}, mlp_only_layers={sorted(dense)}"
    count = c.int("num_hidden_layers")
    return c.layers_where(count, lambda i: i not in dense and (i + 1) % step == 0, why)


def mlp_types_layers(c: HFConfig, fallback, sparse: tuple[str, ...] = ("sparse",)) -> dict:
    """MoE layers from the per-layer ``mlp_layer_types`` list, else ``fallback()``."""
    types = c.get("mlp_layer_types", default=None)
    if types is None:
        return fallback()
    moe = [i for i, t in enumerate(types) if t in sparse]
    return c.layers(moe, len(types), "mlp_layer_types")


def dense_first(c: HFConfig, key: str, default: int) -> dict:
    n = c.int(key, default=default)
    count = c.int("num_hidden_layers")
    return c.layers_where(count, lambda i: i >= n, f"{key}={n}")


def deepseek_balance(c: HFConfig) -> dict:
    """Hub DeepSeek configs carry the original code's ``aux_loss_alpha`` (+ ``seq_aux``). transformers
    computes no loss for these blocks; the coefficient is kept for training with the generated layer.
    """
    alpha = c.float("aux_loss_alpha", default=0.0)
    if not alpha:
        return {}
    return {"seq_aux_loss": alpha} if c.get("seq_aux", default=True) else {"aux_loss": alpha}
