"""The public ops: routing and expert compute as ``torch.library`` custom ops with autograd.

Layering (as in ScatterMoE): Triton kernels (``routing``, ``permute``, ``grouped_gemm``,
``combine``) → these custom ops (fake implementations for ``torch.compile``, autograd formulas) →
thin Python functions ``moe_routing`` / ``moe_experts`` with keyword defaults.

Dispatch: CUDA tensors (or any tensors when this package was imported under ``TRITON_INTERPRET=1``)
run the Triton kernels; other tensors run the plain-torch oracle in ``reference``, so the ops also
work on a CPU without a GPU.

Backward: with the routing held fixed, from the up GEMM's pre-activations the forward saved, with
four grouped GEMMs (``backward``; ``torch._grouped_mm``), or, where that op is missing, by
differentiating the oracle in plain torch (correct, slow). The experts backward is its own custom op
so that ``torch.compile`` never traces its data-dependent shapes.

Ops live in the namespace of the package they are copied into (``pkg.kernels`` → ``pkg_kernels``),
so two generated packages can be imported in one process.

Shape legend: T tokens, H hidden, F expert width, E experts (of this group), K top-k,
X = 2F (GLU) or F (plain MLP).
"""

from typing import Optional

import torch
from torch import Tensor

from . import backward, grouped_gemm, permute, reference, routing
from .combine import combine
from .configs import MoeConfig, pick_config, use_triton

NAMESPACE = (__package__ or "moe_kernels").replace(".", "_")

# (H, F, E, K, weights) -> {token bucket: MoeConfig}; see ``register_configs``.
_CONFIG_TABLES: dict[tuple[int, int, int, int, str], dict] = {}
QUANTIZED_FORMATS = {torch.int8: "int8", torch.uint8: "int4", torch.float8_e4m3fn: "fp8"}


def weight_format(w: Tensor) -> str:
    """How an expert weight is stored: "dense" (in the activations' dtype), or the weight-only
    quantised format "int8", "int4" (uint8, two values per byte) or "fp8" (e4m3)."""
    return QUANTIZED_FORMATS.get(w.dtype, "dense")


def register_configs(H: int, F: int, E: int, K: int, table: dict, weights: str = "dense") -> None:
    """Use ``table`` ({token-count bucket: MoeConfig or dict}) for expert calls of this shape whose
    weights are stored as ``weights`` (see ``weight_format``): the best tiles for int8 or int4
    weights differ from those for bf16 ones of the same shape."""
    if weights not in ("dense", *QUANTIZED_FORMATS.values()):
        raise ValueError(f"weights must be 'dense', 'int8', 'int4' or 'fp8' (got {weights!r})")
    _CONFIG_TABLES[(H, F, E, K, weights)] = dict(table)


def records_autograd(*tensors: Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors``: grad enabled and one of them needs a grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _op_needed(*tensors: Tensor | None) -> bool:
    """Whether a call must go through its custom op: under ``torch.compile`` / export, or when
    autograd must record it. Otherwise the public functions call the implementation directly: the
    op's dispatch costs 10-60 µs of host time a call, as much as the kernels at small T."""
    return torch.compiler.is_compiling() or records_autograd(*tensors)


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::moe_routing", mutates_args=())
def _routing_op(
    logits_TE: Tensor,
    top_k: int,
    selection_bias_E: Optional[Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    score: str,
    topk_on: str,
    n_group: int,
    topk_group: int,
    group_score: str,
    group_masked_value: str,
    weights_from_masked: bool,
    norm: str,
    norm_eps: float,
    norm_clamp_min: float,
    norm_p: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    fn = routing.moe_routing if use_triton(logits_TE) else reference.moe_routing
    ids, w = fn(
        logits_TE, top_k, selection_bias_E, score, topk_on, n_group, topk_group, group_score,
        group_masked_value, weights_from_masked, norm, norm_eps, norm_clamp_min, norm_p, scale,
    )  # fmt: skip
    return ids, w


@_routing_op.register_fake
def _(logits_TE, top_k, *args):
    T = logits_TE.shape[0]
    return (
        logits_TE.new_empty(T, top_k, dtype=torch.int32),
        logits_TE.new_empty(T, top_k, dtype=torch.float32),
    )


def _routing_setup(ctx, inputs, output):
    logits_TE, top_k, selection_bias_E, *options = inputs
    ctx.options = options
    # A copy of the bias: the layer's aux-loss-free update changes it in place after this forward.
    bias_E = None if selection_bias_E is None else selection_bias_E.clone()
    ctx.save_for_backward(logits_TE, bias_E, output[0])


def _routing_backward(ctx, grad_ids, grad_w_TK):
    logits_TE, selection_bias_E, ids_TK = ctx.saved_tensors
    score, topk_on, n_group, topk_group, group_score, _, wfm, norm, eps, cmin, p, scale = (
        ctx.options
    )
    keep = None
    if wfm and n_group > 1:
        key = reference.selection_key(logits_TE, selection_bias_E, score, topk_on)
        keep = reference.group_keep_mask(key, n_group, topk_group, group_score)
    with torch.enable_grad():
        x = logits_TE.detach().requires_grad_()
        w = reference.routing_weights_from_ids(x, ids_TK, score, topk_on, keep)
        w = reference.normalize_weights(w, norm, eps, cmin, p) * scale
        (grad_x,) = torch.autograd.grad(w, x, grad_w_TK)
    return (grad_x,) + (None,) * 14


_routing_op.register_autograd(_routing_backward, setup_context=_routing_setup)


def moe_routing(
    logits_TE: Tensor,
    top_k: int,
    selection_bias_E: Tensor | None = None,
    score: str = "softmax",
    topk_on: str = "scores",
    n_group: int = 1,
    topk_group: int = 1,
    group_score: str = "top2_sum",
    group_masked_value: str = "-inf",
    weights_from_masked: bool = False,
    norm: str = "none",
    norm_eps: float = 0.0,
    norm_clamp_min: float = 0.0,
    norm_p: float = 1.0,
    scale: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Route tokens: (topk_ids_TK int32, topk_weights_TK float32). Differentiable in the logits.

    Every argument is documented on ``routing.moe_routing``.
    """
    op = _routing_op
    if not _op_needed(logits_TE, selection_bias_E):
        op = routing.moe_routing if use_triton(logits_TE) else reference.moe_routing
    return op(
        logits_TE, top_k, selection_bias_E, score, topk_on, n_group, topk_group, group_score,
        group_masked_value, weights_from_masked, norm, norm_eps, norm_clamp_min, norm_p, scale,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------------
def moe_experts_triton(
    x_TH: Tensor,
    topk_ids_TK: Tensor,
    topk_weights_TK: Tensor,
    w_up_EXH: Tensor,
    w_down_EHF: Tensor,
    b_up_EX: Tensor | None = None,
    b_down_EH: Tensor | None = None,
    first_expert_id: int = 0,
    activation: str = "silu",
    glu_form: str = "standard",
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
    weight_on_input: bool = False,
    w_up_scale_EX: Tensor | None = None,
    w_down_scale_EH: Tensor | None = None,
    config: MoeConfig | None = None,
    gu_out_NX: Tensor | None = None,
) -> Tensor:
    """The forward through the kernels (no autograd): align → up GEMM + GLU → down GEMM → combine.

    ``config`` overrides the tile choice (else the registered table or ``default_config``).
    ``gu_out_NX`` ([T*K, X]) receives each slot's pre-activations, for the backward.
    """
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E, _, F = w_down_EHF.shape
    if E == 0:  # a shard holding none of this group's experts (expert parallelism): no slot here
        return x_TH.new_zeros(T, H)
    F *= 2 if w_down_EHF.dtype == torch.uint8 else 1  # int4: two values per byte
    if config is None:
        weights = weight_format(w_down_EHF)
        table = _CONFIG_TABLES.get((H, F, E, K, weights))
        config = pick_config(T, H, F, E, K, x_TH.dtype, table, weights)
    x_TH, w_up_EXH, w_down_EHF = x_TH.contiguous(), w_up_EXH.contiguous(), w_down_EHF.contiguous()
    b_up_EX = None if b_up_EX is None else b_up_EX.contiguous()
    b_down_EH = None if b_down_EH is None else b_down_EH.contiguous()
    ids = topk_ids_TK.to(torch.int32).contiguous()
    rw_N = topk_weights_TK.reshape(-1).float().contiguous()
    al = permute.align_by_expert(ids, E, config.block_m, first_expert_id)
    blocks = al.sorted_slot_ids_P, al.expert_of_block_B, al.expert_offsets_E1
    h_PF = grouped_gemm.up_proj(
        x_TH, w_up_EXH, b_up_EX, rw_N if weight_on_input else None, *blocks, K, config.up,
        activation, glu_form, limit, alpha, gate_softcap, up_softcap, _scale(w_up_scale_EX),
        gu_out_NX,
    )  # fmt: skip
    o_NH = grouped_gemm.down_proj(
        h_PF, w_down_EHF, b_down_EH, None if weight_on_input else rw_N, *blocks, T * K,
        config.down, _scale(w_down_scale_EH),
    )  # fmt: skip
    return combine(o_NH, ids, E, first_expert_id)


def _scale(scale: Tensor | None) -> Tensor | None:
    return None if scale is None else scale.float().contiguous()


def _dequantize(w: Tensor, scale: Tensor | None, dtype: torch.dtype) -> Tensor:
    """int8 / int4 weight rows × their float32 scales in the activations' dtype (float: as is)."""
    return w if scale is None else reference.dequantize(w, scale, dtype)


@torch.library.custom_op(f"{NAMESPACE}::moe_experts", mutates_args=())
def _experts_op(
    x_TH: Tensor,
    topk_ids_TK: Tensor,
    topk_weights_TK: Tensor,
    w_up_EXH: Tensor,
    w_down_EHF: Tensor,
    b_up_EX: Optional[Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    b_down_EH: Optional[Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    first_expert_id: int,
    activation: str,
    glu_form: str,
    limit: float,
    alpha: float,
    gate_softcap: float,
    up_softcap: float,
    weight_on_input: bool,
    w_up_scale_EX: Optional[Tensor] = None,  # noqa: UP045
    w_down_scale_EH: Optional[Tensor] = None,  # noqa: UP045
    save_gu: bool = False,
    static_rows: bool = False,
) -> tuple[Tensor, Tensor]:
    """(y, gu): ``save_gu`` (a call autograd records) and the Triton kernels run: gu is each slot's
    pre-activations [T*K, X], which spare the backward its up GEMM; else gu is empty [0, X].
    ``static_rows`` is for the backward (``moe_experts``)."""
    args = (
        x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
        first_expert_id, activation, glu_form, limit, alpha, gate_softcap, up_softcap,
        weight_on_input, w_up_scale_EX, w_down_scale_EH,
    )  # fmt: skip
    if not use_triton(x_TH):
        return reference.moe_experts(*args), x_TH.new_empty(0, w_up_EXH.shape[1])
    gu = x_TH.new_empty(x_TH.shape[0] * topk_ids_TK.shape[1] if save_gu else 0, w_up_EXH.shape[1])
    return moe_experts_triton(*args, gu_out_NX=gu if save_gu else None), gu


@_experts_op.register_fake
def _(x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, *rest, **named):
    # the dispatcher may leave defaulted trailing arguments out: find save_gu by name or place
    save_gu = named.get("save_gu", rest[13] if len(rest) > 13 else False)
    rows = x_TH.shape[0] * topk_ids_TK.shape[1] if save_gu else 0
    return torch.empty_like(x_TH), x_TH.new_empty(rows, w_up_EXH.shape[1])


@torch.library.custom_op(f"{NAMESPACE}::moe_experts_backward", mutates_args=())
def _experts_backward_op(
    grad_y_TH: Tensor,
    gu_SX: Tensor,
    x_TH: Tensor,
    topk_ids_TK: Tensor,
    topk_weights_TK: Tensor,
    w_up_EXH: Tensor,
    w_down_EHF: Tensor,
    b_up_EX: Optional[Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    b_down_EH: Optional[Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    first_expert_id: int,
    activation: str,
    glu_form: str,
    limit: float,
    alpha: float,
    gate_softcap: float,
    up_softcap: float,
    weight_on_input: bool,
    w_up_scale_EX: Optional[Tensor] = None,  # noqa: UP045
    w_down_scale_EH: Optional[Tensor] = None,  # noqa: UP045
    static_rows: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, routing weights, w_up, w_down, b_up, b_down); an absent bias gets [0].
    ``gu_SX``: the forward's saved pre-activations ([T*K, X]), or empty (recompute them).
    ``static_rows``: run on all T*K slots without a host sync (else only while a CUDA graph is
    captured; ``backward.experts_backward``).

    Grouped GEMMs (``backward.experts_backward``) where ``torch._grouped_mm`` takes the tensors,
    else ``torch.func.vjp`` of the oracle (autograd's own tape is off inside a custom op). int8 /
    int4 weights (with scales) are dequantised first and get no gradient (frozen weights).
    """
    frozen = (False, False, w_up_scale_EX is not None, w_down_scale_EH is not None, False, False)
    w_up_EXH = _dequantize(w_up_EXH, w_up_scale_EX, x_TH.dtype)
    w_down_EHF = _dequantize(w_down_EHF, w_down_scale_EH, x_TH.dtype)
    grads = backward.experts_backward(
        grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
        first_expert_id, activation, glu_form, limit, alpha, gate_softcap, up_softcap,
        weight_on_input, gu_SX=gu_SX if gu_SX.numel() else None,
        static_rows=True if static_rows else None,
    )  # fmt: skip
    if grads is None:
        grads = backward.oracle_vjp(
            grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX,
            b_down_EH, first_expert_id, activation, glu_form, limit, alpha, gate_softcap,
            up_softcap, weight_on_input,
        )  # fmt: skip
    return tuple(
        grad_y_TH.new_empty(0) if g is None or skip else g.contiguous()
        for g, skip in zip(grads, frozen, strict=True)
    )


@_experts_backward_op.register_fake
def _(grad_y_TH, gu_SX, x_TH, ids, w_TK, w_up, w_down, b_up, b_down, *options, **scales):
    # the dispatcher may leave defaulted trailing arguments out: name the scales, do not count
    names = ("w_up_scale_EX", "w_down_scale_EH")
    given = dict(zip(names, options[8:], strict=False)) | scales
    s_up, s_down = (given.get(n) for n in names)

    def like(t, frozen=False):
        return grad_y_TH.new_empty(0) if t is None or frozen else torch.empty_like(t)

    weights = (like(w_up, s_up is not None), like(w_down, s_down is not None))
    return (like(x_TH), like(w_TK), *weights, like(b_up), like(b_down))


def _experts_setup(ctx, inputs, output):
    x, ids, w, w_up, w_down, b_up, b_down, *rest = inputs
    options, (s_up, s_down) = rest[:8], (tuple(rest[8:10]) + (None, None))[:2]
    ctx.options = options
    ctx.static_rows = bool(rest[11]) if len(rest) > 11 else False  # after save_gu
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, ids, w, w_up, w_down, b_up, b_down, s_up, s_down, output[1])


def _experts_backward(ctx, grad_y_TH, _grad_gu):
    x, ids, w, w_up, w_down, b_up, b_down, s_up, s_down, gu = ctx.saved_tensors
    dx, dw, dwu, dwd, dbu, dbd = _experts_backward_op(
        grad_y_TH.contiguous(), gu, x, ids, w, w_up, w_down, b_up, b_down, *ctx.options, s_up,
        s_down, ctx.static_rows,
    )  # fmt: skip
    dwu = dwu if s_up is None else None  # int8 weights are frozen
    dwd = dwd if s_down is None else None
    dbu = dbu if b_up is not None else None
    dbd = dbd if b_down is not None else None
    return (dx, None, dw, dwu, dwd, dbu, dbd) + (None,) * 12


_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup)


def moe_experts(
    x_TH: Tensor,
    topk_ids_TK: Tensor,
    topk_weights_TK: Tensor,
    w_up_EXH: Tensor,
    w_down_EHF: Tensor,
    b_up_EX: Tensor | None = None,
    b_down_EH: Tensor | None = None,
    first_expert_id: int = 0,
    activation: str = "silu",
    glu_form: str = "standard",
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
    weight_on_input: bool = False,
    w_up_scale_EX: Tensor | None = None,
    w_down_scale_EH: Tensor | None = None,
    keep_preactivations: bool = True,
    static_rows: bool = False,
) -> Tensor:
    """y_TH = Σ_k w_tk · expert_{id_tk}(x_t) over the slots of this expert group. Differentiable.

    Args:
        x_TH: [T, H] token activations (bf16 / fp16 / fp32; fp32 GEMMs run as TF32 on GPU).
            The expert weights share x's dtype; biases may be any float dtype.
        topk_ids_TK: [T, K] global expert ids (int32 or int64); -1 = dropped slot (skipped).
        topk_weights_TK: [T, K] routing weights (float32 preferred).
        w_up_EXH: [E, 2F, H] fused gate/up weight (rows [0:F] gate, [F:2F] up; nn.Linear layout),
            or [E, F, H] when ``glu_form="none"``.
        w_down_EHF: [E, H, F] down weight.
        b_up_EX, b_down_EH: optional biases [E, 2F] (or [E, F]) and [E, H].
        first_expert_id: this group handles global ids [first, first+E); other slots contribute 0,
            so groups of different widths/dtypes can each run over the same routing and be summed.
        activation: silu | gelu | gelu_tanh | relu | relu2 | sigmoid.
        glu_form: standard act(g)*u | clamp_then_act act(min(g,L))*clamp(u,±L) | act_then_clamp
            min(act(g),L)*clamp(u,±L) | gpt_oss (clamp(u,±L)+1)*g'*sigmoid(alpha*g'), g'=min(g,L)
            | softcap_sigmoid gc*tanh(g/gc)*sigmoid(g)*uc*tanh(u/uc) | none: act(up) (plain MLP).
        limit, alpha, gate_softcap, up_softcap: parameters of the GLU form (L, alpha, gc, uc).
        weight_on_input: the routing weight scales the expert input (Llama-4) instead of its output.
        w_up_scale_EX, w_down_scale_EH: weight-only quantisation: the weights are int8, or int4
            packed two per byte along the input dimension (uint8, low nibble = even column,
            value = nibble - 8), and weight row r is ``w[..., r, :] * scale[..., r]`` (float32
            scales); the kernels multiply the integer tiles in the activations' dtype and scale
            the accumulators. Such weights get no gradient.
        keep_preactivations: when autograd records the call, keep each slot's pre-activations
            ([T*K, X] in x's dtype, written by the up GEMM's epilogue) so the backward skips the
            up GEMM; False recomputes them in the backward (less memory, one GEMM more).
        static_rows: the backward runs on all T*K slots, this group's first and the others masked
            out, instead of counting this group's slots (a host sync). Cheaper when nearly every
            slot is this group's (a layer with one expert group, unsharded); always so while a
            CUDA graph is captured, where the sync cannot run.

    Returns:
        y_TH [T, H] in x's dtype.
    """
    args = (
        x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
        first_expert_id, activation, glu_form, limit, alpha, gate_softcap, up_softcap,
        weight_on_input, w_up_scale_EX, w_down_scale_EH,
    )  # fmt: skip
    params = (x_TH, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH)
    if not _op_needed(*params):
        return (moe_experts_triton if use_triton(x_TH) else reference.moe_experts)(*args)
    # a call autograd records keeps the pre-activations (T*K x X in x's dtype) for the backward
    return _experts_op(*args, records_autograd(*params) and keep_preactivations, static_rows)[0]
