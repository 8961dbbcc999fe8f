"""Backward of the expert path with grouped GEMMs: one ``torch._grouped_mm`` per product.

The forward is recomputed (routing held fixed) in expert-sorted row order, then

    d_o  = dy[token] · w            (weight on output)       d_w  = Σ_H o · dy[token]
    d_h  = d_o @ W_down[e]          d_W_down[e] = d_o[e rows].T @ h[e rows]
    d_gu = vjp of the GLU (elementwise, float32)
    d_xs = d_gu @ W_up[e]           d_W_up[e]   = d_gu[e rows].T @ xs[e rows]
    dx   = Σ over each token's rows of d_xs

six grouped GEMMs in all, against a per-expert loop of small GEMMs and its autograd tape. GEMMs run
in the activations' dtype with float32 accumulation, elementwise work in float32, as the forward.

``torch._grouped_mm`` is a private PyTorch op: ``experts_backward`` returns None when it is missing
or refuses these tensors, and the caller differentiates the oracle instead (``oracle_vjp``). Shape legend: T tokens,
H hidden, F expert width, X = 2F (GLU) or F, E experts, K top-k, N rows of this group's slots.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .configs import cdiv, use_triton

_REFUSED: set[tuple] = set()  # (device type, dtype) where _grouped_mm failed once: do not retry

# With few experts the per-expert loop is a handful of large GEMMs and was faster (H200, bf16,
# T=4096: Mixtral-8x7B 24 ms loop vs 30 ms grouped; Qwen3-30B-A3B 38 ms loop vs 9 ms grouped).
MIN_EXPERTS = 16


@triton.jit
def _zero_empty_kernel(w_ptr, counts_ptr, M, BLOCK: tl.constexpr):
    """Zero expert e's [M] slice of w when it received no rows; other programs return at once."""
    e = tl.program_id(0)
    if tl.load(counts_ptr + e) != 0:
        return
    base = w_ptr + e.to(tl.int64) * M
    zeros = tl.zeros([BLOCK], w_ptr.dtype.element_ty)
    for start in range(tl.program_id(1) * BLOCK, M, tl.num_programs(1) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(base + offs, zeros, mask=offs < M)


def zero_empty_experts(d_w_E: Tensor, counts_E: Tensor) -> Tensor:
    """Zero, in place, the gradient of each expert that received no rows, and return d_w_E.

    ``torch._grouped_mm`` may leave an empty group's output unwritten (uninitialised memory; some
    GPUs and backends do). Only the empty experts' slices are written and the host never waits:
    a masked fill over the whole [E, ...] gradient cost 0.8 ms a call, plus 0.2 ms for the copy of
    an out-of-place fill, on an H200 for Qwen3-30B-A3B (bench/RESULTS.md, 2026-12-01)."""
    E = d_w_E.shape[0]
    M = d_w_E[0].numel() if E else 0
    if M == 0:
        return d_w_E
    if use_triton(d_w_E):
        BLOCK = 4096
        grid = (E, min(cdiv(M, BLOCK), 16))
        _zero_empty_kernel[grid](d_w_E, counts_E.to(torch.int32), M, BLOCK=BLOCK, num_warps=4)
    else:
        d_w_E.masked_fill_((counts_E == 0).view(E, *[1] * (d_w_E.dim() - 1)), 0)
    return d_w_E


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``torch._grouped_mm(a, b, offs)``, retrying with b column-major (as some backends want)."""
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except RuntimeError:
        return torch._grouped_mm(a, b.transpose(-2, -1).contiguous().transpose(-2, -1), offs=offs)


def experts_backward(
    grad_y_TH: Tensor,
    x_TH: Tensor,
    topk_ids_TK: Tensor,
    topk_weights_TK: Tensor,
    w_up_EXH: Tensor,
    w_down_EHF: Tensor,
    b_up_EX: Tensor | None,
    b_down_EH: Tensor | None,
    first_expert_id: int,
    activation: str,
    glu_form: str,
    limit: float,
    alpha: float,
    gate_softcap: float,
    up_softcap: float,
    weight_on_input: bool,
    min_experts: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """(dx, d routing weights, d w_up, d w_down, d b_up, d b_down), or None (use the oracle):
    fewer than ``min_experts`` experts (default: ``MIN_EXPERTS``, read at the call), or tensors
    ``torch._grouped_mm`` does not take."""
    key = (x_TH.device.type, x_TH.dtype)
    E, X, H = w_up_EXH.shape
    if (
        E < (MIN_EXPERTS if min_experts is None else min_experts)
        or not hasattr(torch, "_grouped_mm")
        or key in _REFUSED
    ):
        return None
    elt = x_TH.element_size()
    F = w_down_EHF.shape[2]
    if any(d * elt % 16 for d in (H, F, X)):  # the op wants 16-byte aligned rows
        return None
    try:
        return _backward(
            grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX,
            b_down_EH, first_expert_id, activation, glu_form, limit, alpha, gate_softcap,
            up_softcap, weight_on_input,
        )  # fmt: skip
    except (RuntimeError, NotImplementedError):  # dtype / layout / device the op does not take
        _REFUSED.add(key)
        return None


def _backward(
    grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
    first, act, form, limit, alpha, gate_cap, up_cap, weight_on_input,
):  # fmt: skip
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E, X, _ = w_up_EXH.shape
    dtype = x_TH.dtype
    slot_N, e_N, counts_E = reference.sort_slots(topk_ids_TK, E, first)
    tok_N = slot_N // K
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    rw_N1 = topk_weights_TK.reshape(-1)[slot_N].float()[:, None]
    if slot_N.numel() == 0:  # no row reaches this group: every gradient is zero
        zeros = [torch.zeros_like(t) for t in (x_TH, topk_weights_TK, w_up_EXH, w_down_EHF)]
        return (*zeros, *(None if b is None else torch.zeros_like(b) for b in (b_up_EX, b_down_EH)))

    xs_NH = x_TH[tok_N]
    xin_NH = (xs_NH.float() * rw_N1).to(dtype) if weight_on_input else xs_NH
    gu_NX = _gmm(xin_NH, w_up_EXH.transpose(1, 2), offs_E).float()
    if b_up_EX is not None:
        gu_NX = gu_NX + b_up_EX[e_N].float()

    def glu(gu):
        g, u = (gu, None) if form == "none" else gu.chunk(2, dim=-1)
        return reference.glu(g, u, act, form, limit, alpha, gate_cap, up_cap)

    h_NF, glu_vjp = torch.func.vjp(glu, gu_NX)
    h_NF = h_NF.to(dtype)
    gy_NH = grad_y_TH[tok_N].float()
    if weight_on_input:
        d_o_NH = gy_NH.to(dtype)
    else:
        o_NH = _gmm(h_NF, w_down_EHF.transpose(1, 2), offs_E).float()
        if b_down_EH is not None:
            o_NH = o_NH + b_down_EH[e_N].float()
        d_rw_N = (o_NH * gy_NH).sum(-1)
        d_o_NH = (gy_NH * rw_N1).to(dtype)

    d_h_NF = _gmm(d_o_NH, w_down_EHF, offs_E)
    d_w_down = zero_empty_experts(_gmm(d_o_NH.t(), h_NF, offs_E), counts_E)
    (d_gu32_NX,) = glu_vjp(d_h_NF.float())
    d_gu_NX = d_gu32_NX.to(dtype)
    d_xin_NH = _gmm(d_gu_NX, w_up_EXH, offs_E).float()
    d_w_up = zero_empty_experts(_gmm(d_gu_NX.t(), xin_NH, offs_E), counts_E)
    if weight_on_input:
        d_rw_N = (d_xin_NH * xs_NH.float()).sum(-1)
        d_xs_NH = d_xin_NH * rw_N1
    else:
        d_xs_NH = d_xin_NH

    # dx: each row's gradient to its slot, then a fixed-order sum over the K slots of each token
    # (deterministic, unlike an index_add_ of the rows into dx: float atomics on CUDA)
    d_xs_SH = torch.zeros(T * K, H, dtype=torch.float32, device=x_TH.device)
    dx_TH = d_xs_SH.index_copy_(0, slot_N, d_xs_NH).view(T, K, H).sum(1)
    d_rw_S = torch.zeros(T * K, dtype=torch.float32, device=x_TH.device)
    d_rw_S[slot_N] = d_rw_N
    d_b_up = d_b_down = None
    if b_up_EX is not None:
        d_b_up = torch.zeros(E, X, dtype=torch.float32, device=x_TH.device)
        d_b_up = d_b_up.index_add_(0, e_N, d_gu32_NX).to(b_up_EX.dtype)
    if b_down_EH is not None:
        d_b_down = torch.zeros(E, H, dtype=torch.float32, device=x_TH.device)
        d_b_down = d_b_down.index_add_(0, e_N, d_o_NH.float()).to(b_down_EH.dtype)
    return (
        dx_TH.to(dtype),
        d_rw_S.view(T, K).to(topk_weights_TK.dtype),
        d_w_up.to(w_up_EXH.dtype),
        d_w_down.to(w_down_EHF.dtype),
        d_b_up,
        d_b_down,
    )


def oracle_vjp(
    grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
    first_expert_id, activation, glu_form, limit, alpha, gate_softcap, up_softcap, weight_on_input,
):  # fmt: skip
    """The expert gradients as ``torch.func.vjp`` of the oracle (an absent bias gets [0]): the
    fallback where ``experts_backward`` returns None (correct, slow)."""
    has_bu, has_bd = b_up_EX is not None, b_down_EH is not None

    def forward(x, w, wu, wd, bu, bd):
        return reference.moe_experts(
            x, topk_ids_TK, w, wu, wd, bu if has_bu else None, bd if has_bd else None,
            first_expert_id, activation, glu_form, limit, alpha, gate_softcap, up_softcap,
            weight_on_input,
        )  # fmt: skip

    empty = grad_y_TH.new_empty(0)
    primals = (
        x_TH, topk_weights_TK, w_up_EXH, w_down_EHF,
        b_up_EX if has_bu else empty, b_down_EH if has_bd else empty,
    )  # fmt: skip
    _, vjp = torch.func.vjp(forward, *primals)
    return vjp(grad_y_TH)
