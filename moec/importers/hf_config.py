"""Reading a Hugging Face ``config.json`` dict: aliases, per-layer lists, defaults and clear errors.

A hub ``config.json`` and ``PreTrainedConfig.to_dict()`` spell some keys differently (transformers'
``attribute_map``: ``num_local_experts`` vs ``n_routed_experts``, ``moe_k`` vs ``num_experts_per_tok``),
so every read names all spellings. A key that is absent takes the transformers 5.23 config-class default
when the architecture has one; a key with no sensible default is required and its absence is a
``UsageError`` naming it. Values that vary per layer (lists) are indexed with the ``layer`` argument.
"""

from __future__ import annotations

from typing import Any

from moec.errors import UsageError

REQUIRED: Any = object()

# transformers ACT2FN name -> moec activation. The tanh GELUs differ only in rounding.
ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "relu2": "relu2",
    "sigmoid": "sigmoid",
}

# config "torch_dtype" / "dtype" -> moec dtype
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class HFConfig:
    """A config dict of one model type, read for one MoE layer (``layer`` or any, when all agree)."""

    def __init__(self, data: dict, model_type: str, layer: int | None):
        self.data = data
        self.model_type = model_type
        self.layer = layer

    def _fail(self, message: str) -> UsageError:
        return UsageError(f"{self.model_type} config: {message}")

    def present(self, *names: str) -> bool:
        return any(self.data.get(n) is not None for n in names)

    def raw(self, name: str, default: Any = None) -> Any:
        """The value as written, ``None`` included (some configs use ``null`` to switch a feature off)."""
        return self.data[name] if name in self.data else default

    def get(self, *names: str, default: Any = REQUIRED, per_layer: bool = False) -> Any:
        """The first of ``names`` that is set; ``null`` counts as unset."""
        for name in names:
            value = self.data.get(name)
            if value is None:
                continue
            if per_layer and isinstance(value, (list, tuple)):
                return self._at_layer(name, list(value))
            return value
        if default is REQUIRED:
            spelled = " or ".join(repr(n) for n in names)
            raise self._fail(f"missing required key {spelled}")
        return default

    def _at_layer(self, name: str, values: list) -> Any:
        if self.layer is not None:
            if not 0 <= self.layer < len(values):
                raise self._fail(
                    f"layer {self.layer} is out of range for {name!r} ({len(values)} entries)"
                )
            return values[self.layer]
        distinct = {repr(v) for v in values}
        if len(distinct) > 1:
            raise self._fail(f"{name!r} differs per layer; pick one with layer=N (--layer N)")
        return values[0]

    def int(self, *names: str, default: Any = REQUIRED, per_layer: bool = False) -> int:
        value = self.get(*names, default=default, per_layer=per_layer)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise self._fail(f"{names[0]!r} must be an integer (got {value!r})")
        return int(value)

    def float(self, *names: str, default: Any = REQUIRED, per_layer: bool = False) -> float:
        value = self.get(*names, default=default, per_layer=per_layer)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(f"{names[0]!r} must be a number (got {value!r})")
        return float(value)

    def bool(self, *names: str, default: Any = REQUIRED) -> bool:
        value = self.get(*names, default=default)
        if not isinstance(value, bool):
            raise self._fail(f"{names[0]!r} must be true or false (got {value!r})")
        return value

    def act(self, *names: str, default: Any = "silu") -> str:
        value = self.get(*names, default=default)
        if isinstance(value, dict):  # DBRX: ffn_act_fn = {"name": "silu"}
            value = value.get("name", "silu")
        if value not in ACTIVATIONS:
            known = ", ".join(sorted(ACTIVATIONS))
            raise self._fail(f"activation {value!r} is not in the moec vocabulary (known: {known})")
        return ACTIVATIONS[value]

    def refuse(self, message: str) -> UsageError:
        """An architecture feature the spec vocabulary cannot express."""
        return self._fail(f"cannot be expressed as a moec spec: {message}")

    # -- which decoder layers are MoE -------------------------------------------------------------

    def layers(self, moe: list[int], count: int, why: str) -> dict:
        """``{count, first, every}`` for the MoE layer indices ``moe`` of ``count`` decoder layers.

        The spec says "every ``every``-th layer from ``first``"; other patterns are refused rather than
        approximated. Also checks that the requested ``layer`` is one of them.
        """
        if not moe:
            raise self._fail(f"no decoder layer is an MoE layer ({why})")
        first = moe[0]
        every = moe[1] - moe[0] if len(moe) > 1 else max(1, count - first)
        if moe != list(range(first, count, every)):
            shown = moe if len(moe) <= 16 else moe[:16] + ["..."]
            raise self.refuse(
                f"the MoE layers {shown} ({why}) are not every N-th layer from one start "
                f"(layers: {{first, every}} cannot express them)"
            )
        if self.layer is not None and self.layer >= count:
            raise self._fail(f"layer {self.layer} is out of range: the model has {count} layers")
        if self.layer is not None and self.layer not in moe:
            raise self._fail(f"layer {self.layer} is a dense layer, not an MoE layer ({why})")
        return {"count": count, "first": first, "every": every}

    def layers_where(self, count: int, is_moe, why: str) -> dict:
        return self.layers([i for i in range(count) if is_moe(i)], count, why)
