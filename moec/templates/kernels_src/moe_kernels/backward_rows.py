"""Row-wise pieces of the grouped-GEMM backward (``backward``): Triton kernels that keep tensors in
the activations' dtype between the GEMMs and compute in float32 in registers, each with a
plain-torch twin where Triton cannot run (``configs.use_triton``).

- ``zero_empty_experts``: zero the weight gradients of experts that got no rows, in place;
- ``glu_rows`` / ``glu_rows_vjp``: the GLU of each row's pre-activations, and its vjp (written by
  hand for every activation and form: ``epilogue.glu_vjp``);
- ``dot_and_scale``: each row's dot product with another row, and one of them scaled by the row's
  routing weight (the routing weights' gradient and the weighted rows in one pass);
- ``sum_slots``: each token's rows summed in slot order (deterministic: no atomics).

Shape legend: T tokens, H hidden, F expert width, X = 2F (GLU) or F, E experts, K top-k, N rows of
this group's slots, R rows of a table gathered by index.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .combine import sum_rows_of_slots
from .configs import cdiv, next_power_of_2, use_triton
from .epilogue import glu, glu_vjp
from .launch import launch


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
        launch(
            _zero_empty_kernel, grid, d_w_E, counts_E.to(torch.int32), M, BLOCK=BLOCK, num_warps=4
        )
    else:
        d_w_E.masked_fill_((counts_E == 0).view(E, *[1] * (d_w_E.dim() - 1)), 0)
    return d_w_E


# --------------------------------------------------------------------------------------------------
# The GLU and its vjp, row products, the sum over a token's rows
# --------------------------------------------------------------------------------------------------
@triton.jit
def _glu_rows_kernel(
    gu_ptr,  # [N, X] gate and up pre-activations (without the bias, if HAS_BIAS)
    b_ptr,  # [E, X] (if HAS_BIAS)
    e_ptr,  # [N] local expert of each row (if HAS_BIAS)
    dh_ptr,  # [N, F] (if VJP)
    out_ptr,  # [N, F] h, or [N, X] d_gu (if VJP)
    rw_ptr,  # [N] float32 routing weights (if WEIGHTED)
    hw_ptr,  # [N, F] out: h · rw (if WEIGHTED)
    total,  # N * F
    limit,
    alpha,
    gate_cap,
    up_cap,
    F: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    VJP: tl.constexpr,
    WEIGHTED: tl.constexpr,
    ACT: tl.constexpr,
    FORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    GLU: tl.constexpr = FORM != "none"
    X: tl.constexpr = 2 * F if GLU else F
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    n = offs // F
    f = offs % F
    g = tl.load(gu_ptr + n * X + f, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + n * X + F + f, mask=ok, other=0.0).to(tl.float32) if GLU else g
    if HAS_BIAS:
        e = tl.load(e_ptr + n, mask=ok, other=0).to(tl.int64)
        g += tl.load(b_ptr + e * X + f, mask=ok, other=0.0).to(tl.float32)
        if GLU:
            u += tl.load(b_ptr + e * X + F + f, mask=ok, other=0.0).to(tl.float32)
    if VJP:
        dh = tl.load(dh_ptr + n * F + f, mask=ok, other=0.0).to(tl.float32)
        dg, du = glu_vjp(g, u, dh, limit, alpha, gate_cap, up_cap, ACT, FORM)
        tl.store(out_ptr + n * X + f, dg.to(out_ptr.dtype.element_ty), mask=ok)
        if GLU:
            tl.store(out_ptr + n * X + F + f, du.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        h = glu(g, u, limit, alpha, gate_cap, up_cap, ACT, FORM).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + n * F + f, h, mask=ok)
        if WEIGHTED:  # the stored h (rounded) times the weight, as the plain-torch twin
            hw = h.to(tl.float32) * tl.load(rw_ptr + n, mask=ok, other=0.0)
            tl.store(hw_ptr + n * F + f, hw.to(hw_ptr.dtype.element_ty), mask=ok)


def _glu32(gu_NX, b_EX, e_N, act, form, limit, alpha, gate_cap, up_cap) -> Tensor:
    """The GLU of [N, X] pre-activations (+ each row's expert bias) in float32 (plain torch)."""
    gu = gu_NX.float() if b_EX is None else gu_NX.float() + b_EX[e_N].float()
    g, u = (gu, None) if form == "none" else gu.chunk(2, dim=-1)
    return reference.glu(g, u, act, form, limit, alpha, gate_cap, up_cap)


def _glu_launch(gu_NX, b_EX, e_N, dh_NF, out, rw_N, hw_NF, glu_params):
    gu_NX = gu_NX.contiguous()  # the kernel walks rows of X elements (dh_NF: of F)
    dh_NF = None if dh_NF is None else dh_NF.contiguous()
    N, F = gu_NX.shape[0], out.shape[1] if dh_NF is None else dh_NF.shape[1]
    act, form, limit, alpha, gate_cap, up_cap = glu_params
    BLOCK = 1024
    launch(
        _glu_rows_kernel, (cdiv(N * F, BLOCK),),
        gu_NX, b_EX if b_EX is not None else gu_NX, e_N, dh_NF if dh_NF is not None else gu_NX,
        out, rw_N if rw_N is not None else gu_NX, hw_NF if hw_NF is not None else out, N * F,
        float(limit), float(alpha), float(gate_cap), float(up_cap), F=F,
        HAS_BIAS=b_EX is not None, VJP=dh_NF is not None, WEIGHTED=hw_NF is not None, ACT=act,
        FORM=form, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return out


def glu_rows(
    gu_NX, b_EX, e_N, act, form, limit, alpha, gate_cap, up_cap, rw_N=None
) -> tuple[Tensor, Tensor | None]:
    """(h_NF = glu(gu + b[e]), h_NF · rw_N when rw_N is given) in gu's dtype, computed in float32."""
    N, X = gu_NX.shape
    F = X if form == "none" else X // 2
    if not use_triton(gu_NX):
        h = _glu32(gu_NX, b_EX, e_N, act, form, limit, alpha, gate_cap, up_cap).to(gu_NX.dtype)
        return h, None if rw_N is None else (h.float() * rw_N[:, None]).to(h.dtype)
    h = torch.empty(N, F, dtype=gu_NX.dtype, device=gu_NX.device)
    hw = None if rw_N is None else torch.empty_like(h)
    if N:
        params = (act, form, limit, alpha, gate_cap, up_cap)
        _glu_launch(gu_NX, b_EX, e_N, None, h, rw_N, hw, params)
    return h, hw


def glu_rows_vjp(gu_NX, d_h_NF, b_EX, e_N, act, form, limit, alpha, gate_cap, up_cap) -> Tensor:
    """d_gu_NX: the vjp of ``glu_rows`` at gu with d_h, in gu's dtype (computed in float32)."""
    if not use_triton(gu_NX):

        def f(gu):
            return _glu32(gu, b_EX, e_N, act, form, limit, alpha, gate_cap, up_cap)

        _, vjp = torch.func.vjp(f, gu_NX.float())
        return vjp(d_h_NF.float())[0].to(gu_NX.dtype)
    d_gu = torch.empty_like(gu_NX)
    if gu_NX.shape[0]:
        params = (act, form, limit, alpha, gate_cap, up_cap)
        _glu_launch(gu_NX, b_EX, e_N, d_h_NF, d_gu, None, None, params)
    return d_gu


@triton.jit
def _dot_and_scale_kernel(
    a_ptr,  # [N, H]
    ab_ptr,  # [E, H] bias added to a's rows (if A_BIAS)
    e_ptr,  # [N] local expert of each row (if A_BIAS)
    b_ptr,  # [*, H] rows gathered by idx
    idx_ptr,  # [N]
    rw_ptr,  # [N] float32
    dot_ptr,  # [N] float32 out
    out_ptr,  # [N, H] out
    H: tl.constexpr,
    A_BIAS: tl.constexpr,
    SCALE_A: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row_b = tl.load(idx_ptr + n).to(tl.int64)
    rw = tl.load(rw_ptr + n)
    if A_BIAS:
        ab_ptr += tl.load(e_ptr + n).to(tl.int64) * H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        ok = offs < H
        a = tl.load(a_ptr + n * H + offs, mask=ok, other=0.0).to(tl.float32)
        if A_BIAS:
            a += tl.load(ab_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row_b * H + offs, mask=ok, other=0.0).to(tl.float32)
        acc += a * b
        scaled = (a if SCALE_A else b) * rw
        tl.store(out_ptr + n * H + offs, scaled.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(dot_ptr + n, tl.sum(acc, axis=0))


def dot_and_scale(a_NH, a_bias_EH, e_N, b_RH, idx_N, rw_N, scale_a: bool):
    """(Σ_H (a + a_bias[e]) · b[idx] per row (float32 [N]), (a if scale_a else b[idx]) · rw in
    a's dtype [N, H]); float32 products, a fixed-order sum (deterministic). ``scale_a`` with a
    bias is not needed (the bias would be scaled too) and not allowed."""
    assert not (scale_a and a_bias_EH is not None)
    N, H = a_NH.shape
    if not use_triton(a_NH):
        a = a_NH.float() if a_bias_EH is None else a_NH.float() + a_bias_EH[e_N].float()
        b = b_RH[idx_N].float()
        return (a * b).sum(-1), ((a if scale_a else b) * rw_N[:, None]).to(a_NH.dtype)
    a_NH, b_RH = a_NH.contiguous(), b_RH.contiguous()  # the kernel walks rows of H elements
    dot = torch.empty(N, dtype=torch.float32, device=a_NH.device)
    out = torch.empty_like(a_NH)
    if N:
        launch(
            _dot_and_scale_kernel, (N,),
            a_NH, a_bias_EH if a_bias_EH is not None else a_NH, e_N, b_RH, idx_N,
            rw_N.float().contiguous(), dot, out, H=H, A_BIAS=a_bias_EH is not None,
            SCALE_A=scale_a, BLOCK_H=min(1024, next_power_of_2(H)), num_warps=4,
        )  # fmt: skip
    return dot, out


def sum_slots(d_NH, slot_N, T: int, K: int, valid_N=None) -> Tensor:
    """dx_TH: row n of d added to token slot_N[n] // K, each token's rows summed in slot order
    (float32 sum, deterministic; a token with no row here gets zeros). Rows where ``valid_N`` is
    False are left out (their values may be garbage)."""
    if use_triton(d_NH):  # each token's rows read in place, through the row of each slot
        row_N = torch.arange(len(slot_N), dtype=torch.int32, device=d_NH.device)
        row_S = torch.full((T * K,), -1, dtype=torch.int32, device=d_NH.device)
        row_S[slot_N] = row_N if valid_N is None else torch.where(valid_N, row_N, -1)
        return sum_rows_of_slots(d_NH.contiguous(), row_S.view(T, K))
    d_SH = torch.zeros(T * K, d_NH.shape[1], dtype=d_NH.dtype, device=d_NH.device)
    if valid_N is not None:
        d_NH = torch.where(valid_N[:, None], d_NH, 0.0)
    d_SH.index_copy_(0, slot_N, d_NH)
    return d_SH.view(T, K, -1).sum(1, dtype=torch.float32).to(d_NH.dtype)
