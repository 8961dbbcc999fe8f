"""Backward of the expert path with grouped GEMMs: one ``torch._grouped_mm`` per product.

The up GEMM's pre-activations gu come from the forward (the custom op saves them when autograd
records the call), else the up GEMM is recomputed; in expert-sorted row order, h = glu(gu), then
(weight w on the output: y = Σ w · o, o = h @ W_down[e].T + b_down)

    d_hu = dy[token] @ W_down[e]     d_W_down[e] = dy[e rows].T @ (w · h)[e rows]
    d_w  = h · d_hu + b_down · dy    d_h = w · d_hu        (o itself is never recomputed)
    d_gu = vjp of the GLU (elementwise, float32)
    d_xs = d_gu @ W_up[e]            d_W_up[e]   = d_gu[e rows].T @ xs[e rows]
    dx   = Σ over each token's rows of d_xs

four grouped GEMMs (five when gu is recomputed), against a per-expert loop of small GEMMs and its
autograd tape. GEMMs run in the activations' dtype with float32 accumulation, elementwise work in
float32, as the forward.
Tensors stay in the activations' dtype between the GEMMs: the GLU and its vjp, the routing-weight
products and the sum over each token's rows are Triton kernels that compute in float32 in registers
(``backward_rows``), with plain-torch twins where Triton cannot run.

``torch._grouped_mm`` is a private PyTorch op: ``experts_backward`` returns None when it is missing
or refuses these tensors, and the caller differentiates the oracle instead (``oracle_vjp``).
Shape legend: T tokens, H hidden, F expert width, X = 2F (GLU) or F, E experts, K top-k, N rows of
this group's slots.
"""

import torch
from torch import Tensor

from . import reference
from .backward_rows import dot_and_scale, glu_rows, glu_rows_vjp, sum_slots, zero_empty_experts

_REFUSED: set[tuple] = set()  # (device type, dtype) where _grouped_mm failed once: do not retry


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
    gu_SX: Tensor | None = None,
    static_rows: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """(dx, d routing weights, d w_up, d w_down, d b_up, d b_down), or None (use the oracle) for
    tensors ``torch._grouped_mm`` does not take.

    ``gu_SX``: the forward's pre-activations of each slot ([T*K, X], ``grouped_gemm.up_proj``'s
    ``gu_out_NX``), which spare the up GEMM's recompute. Used at any number of experts: with the
    pre-activations kept, even Mixtral-8x7B's 8 experts train faster this way than through the
    per-expert loop (H200, T=4096: 16.7 ms a step against 22.8 ms; bench/RESULTS.md).

    ``static_rows`` (default: while a CUDA graph is being captured) runs on all T*K slots, this
    group's first in expert order and the others after them, masked out: no host sync (the exact
    row count needs one: ``torch.nonzero``), so the backward can be captured, at the cost of
    elementwise work on the rows of other groups and of dropped slots."""
    key = (x_TH.device.type, x_TH.dtype)
    E, X, H = w_up_EXH.shape
    if not hasattr(torch, "_grouped_mm") or key in _REFUSED:
        return None
    elt = x_TH.element_size()
    F = w_down_EHF.shape[2]
    if any(d * elt % 16 for d in (H, F, X)):  # the op wants 16-byte aligned rows
        return None
    try:
        return _backward(
            grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX,
            b_down_EH, first_expert_id, activation, glu_form, limit, alpha, gate_softcap,
            up_softcap, weight_on_input, gu_SX, _capturing() if static_rows is None else static_rows,
        )  # fmt: skip
    except (RuntimeError, NotImplementedError):  # dtype / layout / device the op does not take
        _REFUSED.add(key)
        return None


def _backward(
    grad_y_TH, x_TH, topk_ids_TK, topk_weights_TK, w_up_EXH, w_down_EHF, b_up_EX, b_down_EH,
    first, act, form, limit, alpha, gate_cap, up_cap, weight_on_input, gu_SX, static_rows,
):  # fmt: skip
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E, X, _ = w_up_EXH.shape
    dtype = x_TH.dtype
    slot_N, e_N, counts_E, valid_N = _sorted_slots(topk_ids_TK, E, first, static_rows)
    tok_N = slot_N // K
    offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
    rw_N = topk_weights_TK.reshape(-1)[slot_N].float()
    # no row reaches this group (static rows: no slot at all, or a shard holding no expert of it)
    if slot_N.numel() == 0 or E == 0:  # every gradient is zero
        zeros = [torch.zeros_like(t) for t in (x_TH, topk_weights_TK, w_up_EXH, w_down_EHF)]
        return (*zeros, *(None if b is None else torch.zeros_like(b) for b in (b_up_EX, b_down_EH)))

    xs_NH = x_TH[tok_N]
    xin_NH = (xs_NH.float() * rw_N[:, None]).to(dtype) if weight_on_input else xs_NH
    if gu_SX is None:  # recompute the up GEMM (no bias: glu_rows adds it)
        gu_NX, b_gu_EX = _gmm(xin_NH, w_up_EXH.transpose(1, 2), offs_E), b_up_EX
    else:  # the forward's, bias included
        gu_NX, b_gu_EX = gu_SX.index_select(0, slot_N), None
    glu_args = (b_gu_EX, e_N, act, form, limit, alpha, gate_cap, up_cap)
    dy_NH = grad_y_TH[tok_N]
    if weight_on_input:  # o = h W_down.T sums into y as is
        h_NF, _ = glu_rows(gu_NX, *glu_args)
        d_h_NF = _gmm(dy_NH, w_down_EHF, offs_E)
        d_w_down = _gmm(dy_NH.t(), h_NF, offs_E)
    else:
        # y = Σ rw · o with o = h W_down.T + b: d_rw = o · dy = h · (dy W_down) + b · dy, so the
        # unweighted d_hu = dy W_down gives d_rw and d_h = rw · d_hu without recomputing o.
        h_NF, hw_NF = glu_rows(gu_NX, *glu_args, rw_N=rw_N)
        d_hu_NF = _gmm(dy_NH, w_down_EHF, offs_E)
        d_w_down = _gmm(dy_NH.t(), hw_NF, offs_E)
        arange_N = torch.arange(len(slot_N), device=x_TH.device)
        d_rw_N, d_h_NF = dot_and_scale(d_hu_NF, None, e_N, h_NF, arange_N, rw_N, True)
        if b_down_EH is not None:
            d_rw_N = d_rw_N + (dy_NH.float() * b_down_EH[e_N].float()).sum(-1)
    d_w_down = zero_empty_experts(d_w_down, counts_E)
    d_gu_NX = glu_rows_vjp(gu_NX, d_h_NF, *glu_args)
    d_xin_NH = _gmm(d_gu_NX, w_up_EXH, offs_E)
    d_w_up = zero_empty_experts(_gmm(d_gu_NX.t(), xin_NH, offs_E), counts_E)
    if weight_on_input:  # d_rw = d_xin · x[token], d_xs = d_xin · w
        d_rw_N, d_xs_NH = dot_and_scale(d_xin_NH, None, e_N, x_TH, tok_N, rw_N, True)
    else:
        d_xs_NH = d_xin_NH

    # dx: a fixed-order sum over the K slots of each token (deterministic, unlike an index_add_ of
    # the rows into dx: float atomics on CUDA)
    dx_TH = sum_slots(d_xs_NH, slot_N, T, K, valid_N)
    d_rw_S = torch.zeros(T * K, dtype=torch.float32, device=x_TH.device)
    d_rw_S[slot_N] = d_rw_N if valid_N is None else torch.where(valid_N, d_rw_N, 0.0)
    # the bias sums: masked rows (static_rows) go to an extra expert E, dropped at the end
    bin_N = e_N if valid_N is None else torch.where(valid_N, e_N, E)
    d_b_up = d_b_down = None
    if b_up_EX is not None:
        d_b_up = torch.zeros(E + 1, X, dtype=torch.float32, device=x_TH.device)
        d_b_up = d_b_up.index_add_(0, bin_N, d_gu_NX.float())[:E].to(b_up_EX.dtype)
    if b_down_EH is not None:
        d_b_down = torch.zeros(E + 1, H, dtype=torch.float32, device=x_TH.device)
        d_o_NH = dy_NH.float() if weight_on_input else dy_NH.float() * rw_N[:, None]
        d_b_down = d_b_down.index_add_(0, bin_N, d_o_NH)[:E].to(b_down_EH.dtype)
    return (
        dx_TH,
        d_rw_S.view(T, K).to(topk_weights_TK.dtype),
        d_w_up.to(w_up_EXH.dtype),
        d_w_down.to(w_down_EHF.dtype),
        d_b_up,
        d_b_down,
    )


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (a host sync would fail)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sorted_slots(topk_ids_TK: Tensor, E: int, first: int, static_rows: bool):
    """(slot_N, local expert_N, counts_E, valid_N): the slots of this group in expert order (stable).

    ``static_rows``: all T*K slots, without a host sync; the group's lead in expert order, the
    others (other groups' and dropped slots) follow with valid_N False and the last expert's id, so
    that every lookup by expert stays in range; the grouped GEMMs stop at the last offset, and
    everything else masks them out. Else only the group's slots (``torch.nonzero``: a host sync),
    and valid_N is None."""
    if not static_rows:
        return (*reference.sort_slots(topk_ids_TK, E, first), None)
    ids_S = topk_ids_TK.reshape(-1).long()
    e_S = ids_S - first
    key_S = torch.where((ids_S >= 0) & (e_S >= 0) & (e_S < E), e_S, E)
    slot_N = torch.argsort(key_S, stable=True)
    key_N = key_S[slot_N]
    counts_E = torch.zeros(E + 1, dtype=torch.long, device=key_S.device)
    counts_E = counts_E.index_add_(0, key_S, torch.ones_like(key_S))[:E]
    return slot_N, key_N.clamp(max=E - 1), counts_E, key_N < E


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
