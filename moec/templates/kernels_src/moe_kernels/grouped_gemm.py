"""Grouped GEMMs over expert-sorted slots, with the GLU and the routing weight fused.

- ``up_proj``: h[p] = glu(x[token(p)] @ w_gate_up[e].T + b) for each padded row p of expert e.
  The gate rows [0:F] and up rows [F:2F] of one output tile are computed by the same program (one
  dot over their columns interleaved), so the GLU runs in the epilogue and h is written once.
- ``down_proj``: o[slot(p)] = w_slot · (h[p] @ w_down[e].T + b): rows go straight to token order.
- then ``combine.combine`` sums each token's K rows: y[t] = Σ_k o[t*K + k].

Weight-only quantised experts (int8, fp8 e4m3, int4 packed two per byte) load their stored tiles,
convert them to the activations' dtype in registers (``epilogue.weight_tile``) and multiply the
accumulators by each weight row's scale, so the weights stream at their stored size.

Tail tiles: with tiles of ``TAIL_MIN_BLOCK_M`` rows or more, a row block holding at most half a
block of slots (an expert's last) runs a half-height tile, so its padding rows are not multiplied;
with the config's ``tail_div`` 4, one of at most a quarter block a quarter-height tile.

Folded tails (the config's ``fold_m``): an expert's last block holding at most ``fold_m`` slots,
after a full block of the same expert, runs no program of its own. The full block's program also
computes those rows, from the same weight tiles in shared memory, so the expert's weights stream
through the SMs once instead of twice (DeepSeek-V3 at T=4096: ~128 rows per expert, and about half
the experts hold a few more).

Shape legend: T tokens, H hidden, F expert width, E experts, K top-k, N = T*K slots,
P padded rows (multiple of BLOCK_M), X = 2F (GLU) or F (plain MLP).
"""

from dataclasses import replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .configs import GemmConfig, cdiv
from .epilogue import glu, weight_tile
from .launch import launch


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _tile_ids(eob_ptr, off_ptr, sorted_ptr, N, N_OUT: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP_M: tl.constexpr, ALIGN_M: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """(pid_m, pid_n, e) of this program: its row block, output tile and local expert, e = -1
    when the block holds no slot (skip it).

    Grouped ordering within each expert: the programs of expert e are the contiguous range of
    program ids [first * num_n, (first + nb) * num_n) (first, nb: its first row block and its
    number of row blocks), taken in groups of GROUP_M of its row blocks, which share each weight
    tile while it sits in L2. No group spans two experts: with groups over all row blocks, an
    expert cut by a group boundary streamed its weights from memory once per group. On an H200
    (2026-12-02, bench/RESULTS.md) that cut the GEMMs' DRAM reads by 12-28% at T=16384
    (DeepSeek-V3, Mixtral) and made the expert path 1.01-1.04x faster for DeepSeek-V3 (T=4096,
    16384) and Mixtral (T=4096), other shapes within noise. With GROUP_M 1 both orders are the
    row-major one, and no offset is read.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    # program pid lies in expert e's range exactly when its row-major block pid // num_n does
    e = tl.load(eob_ptr + pid_m * BLOCK_M // ALIGN_M)
    if GROUP_M > 1:
        if e >= 0:  # (e < 0: a program past the last expert's blocks, skipped below)
            first = tl.load(off_ptr + e) // BLOCK_M
            nb = tl.load(off_ptr + e + 1) // BLOCK_M - first
            local = pid - first * num_n
            in_group = GROUP_M * num_n
            first_m = (local // in_group) * GROUP_M
            size_m = tl.minimum(nb - first_m, GROUP_M)
            pid_m = first + first_m + (local % in_group) % size_m
            pid_n = (local % in_group) // size_m
    # Valid rows lead each expert's segment, so a block whose first row is padding is all padding.
    if BLOCK_M < ALIGN_M:
        e = tl.where(tl.load(sorted_ptr + pid_m * BLOCK_M) < N, e, -1)
    return pid_m, pid_n, e


@triton.jit
def _block_rows(pid_m, sorted_ptr, N, BLOCK_M: tl.constexpr):
    """Slots of row block pid_m (valid rows lead each expert's segment: they are the first ones)."""
    return tl.sum((tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) < N).to(tl.int32))


@triton.jit
def _fold_rows(pid_m, num_blocks_m, eob_ptr, sorted_ptr, N, e, BLOCK_M: tl.constexpr,
               FOLD_M: tl.constexpr):  # fmt: skip
    """Fold of an expert's last few slots into the program of its previous block (row blocks as
    tall as the alignment, so that block i is eob[i]): the slots of block pid_m + 1 when it is
    expert e's last and holds at most FOLD_M (this program computes them too), -1 when block pid_m
    is such a block (computed by the program of block pid_m - 1: skip it), else 0."""
    prev = tl.load(eob_ptr + pid_m - 1, mask=pid_m > 0, other=-1)
    nxt = tl.load(eob_ptr + pid_m + 1, mask=pid_m + 1 < num_blocks_m, other=-1)
    fold = 0
    if prev == e:
        if _block_rows(pid_m, sorted_ptr, N, BLOCK_M) <= FOLD_M:
            fold = -1
    if nxt == e:
        nxt_rows = _block_rows(pid_m + 1, sorted_ptr, N, BLOCK_M)
        if nxt_rows <= FOLD_M:
            fold = nxt_rows
    return fold


@triton.jit
def _fold_step(acc_f, wt, f_ptrs, k, offs_k, K: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr):  # fmt: skip
    """K step k of the folded rows (at f_ptrs, K long): acc_f [NB, FOLD_M] += wt.T @ rows.T, the
    weight tile wt already in registers for the block's own rows."""
    if EVEN_K:
        af = tl.load(f_ptrs)
    else:
        af = tl.load(f_ptrs, mask=(offs_k < K - k * BLOCK_K)[None, :], other=0.0)
    return tl.dot(tl.trans(wt), tl.trans(af), acc_f)


@triton.jit
def _up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, X, H]   X = 2F (gate rows, then up rows) or F
    b_ptr,  # [E, X]      (if HAS_BIAS)
    s_ptr,  # [E, X] float32 scale of each weight row (if W_SCALED: w is int8, w * s is the weight)
    rw_ptr,  # [N] float32 routing weights (if WEIGHT_ON_INPUT)
    sorted_ptr,  # [P] int32 slot ids, sentinel N on padding
    eob_ptr,  # [B] int32 expert of each row block, -1 = empty
    off_ptr,  # [E + 1] int32 first padded row of each expert
    h_ptr,  # [P, F] out
    gu_ptr,  # [N, X] out, slot order: the pre-activations, for the backward (if STORE_GU)
    N,
    num_blocks_m,
    limit,
    alpha,
    gate_cap,
    up_cap,
    H: tl.constexpr,
    F: tl.constexpr,
    TOPK: tl.constexpr,
    ACT: tl.constexpr,
    FORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_SCALED: tl.constexpr,
    W_INT4: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr,
    STORE_GU: tl.constexpr,
    ALIGN_M: tl.constexpr,
    TAIL_M: tl.constexpr,
    FOLD_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n, e = _tile_ids(
        eob_ptr, off_ptr, sorted_ptr, N, F, BLOCK_N, GROUP_M, ALIGN_M, BLOCK_M
    )
    if e < 0:
        return
    # An expert's last block holding at most FOLD_M slots is computed by the program of the
    # block before it (from the same weight tiles), and skipped here.
    # Without a fold (constexpr) `fold` stays the Python int 0: the branches below resolve at
    # compile time and only _up_block is compiled.
    fold = 0
    if FOLD_M > 0:
        fold = _fold_rows(pid_m, num_blocks_m, eob_ptr, sorted_ptr, N, e, BLOCK_M, FOLD_M)
    if fold > 0:
        _up_tile(
            x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
            gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
            W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, BLOCK_M, BLOCK_N, BLOCK_K, FOLD_M,
        )  # fmt: skip
    elif fold == 0:
        _up_block(
            x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
            gate_cap, up_cap, pid_m, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS, W_SCALED,
            W_INT4, WEIGHT_ON_INPUT, STORE_GU, TAIL_M, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _up_block(
    x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha, gate_cap,
    up_cap, pid_m, pid_n, e, H: tl.constexpr, F: tl.constexpr, TOPK: tl.constexpr,
    ACT: tl.constexpr, FORM: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr,
    W_INT4: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, STORE_GU: tl.constexpr,
    TAIL_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row block pid_m of expert e, in the tile its slots need: a block holding at most TAIL_M
    slots (an expert's last) computes TAIL_M rows, not BLOCK_M."""
    # The constexpr test comes first, so that without tail tiles no 0-row tile is compiled.
    if TAIL_M > 0:
        rows = _block_rows(pid_m, sorted_ptr, N, BLOCK_M)
        if rows <= TAIL_M:
            _up_tile(
                x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
                gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
                W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, TAIL_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        elif TAIL_M == BLOCK_M // 2:  # (constexpr) no quarter tiles: only the full one is left
            _up_tile(
                x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
                gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
                W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        elif rows <= BLOCK_M // 2:
            _up_tile(
                x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
                gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
                W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, BLOCK_M // 2, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            _up_tile(
                x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
                gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
                W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        _up_tile(
            x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha,
            gate_cap, up_cap, pid_m * BLOCK_M, pid_n, e, H, F, TOPK, ACT, FORM, HAS_BIAS,
            W_SCALED, W_INT4, WEIGHT_ON_INPUT, STORE_GU, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _up_tile(
    x_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit, alpha, gate_cap,
    up_cap, row0, pid_n, e, H: tl.constexpr, F: tl.constexpr, TOPK: tl.constexpr,
    ACT: tl.constexpr, FORM: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr,
    W_INT4: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, STORE_GU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FOLD_M: tl.constexpr = 0,
):  # fmt: skip
    """Rows [row0, row0 + BLOCK_M) x output columns pid_n of the up GEMM, all of expert e; with
    FOLD_M > 0 also the FOLD_M rows after them (the expert's last few), from the same weight tiles.
    """
    GLU: tl.constexpr = FORM != "none"
    X: tl.constexpr = 2 * F if GLU else F
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    KW: tl.constexpr = H // 2 if W_INT4 else H  # stored weight row length (int4: 2 per byte)
    BKW: tl.constexpr = BLOCK_K // 2 if W_INT4 else BLOCK_K
    offs_kw = tl.arange(0, BKW)

    a_ptrs = x_ptr + _token_rows(sorted_ptr, offs_m, N, TOPK)[:, None] * H + offs_k[None, :]
    if FOLD_M > 0:
        offs_f = row0 + BLOCK_M + tl.arange(0, FOLD_M)
        f_ptrs = x_ptr + _token_rows(sorted_ptr, offs_f, N, TOPK)[:, None] * H + offs_k[None, :]
    w_e = w_ptr + e.to(tl.int64) * (X * KW)
    EVEN_K: tl.constexpr = H % BLOCK_K == 0  # no masks in the main loop (the usual case)
    if GLU:
        # One dot over 2*BLOCK_N columns, gate and up interleaved (even = gate, odd = up): A is
        # read once per K step and the tensor cores run their widest instruction (1.00-1.04x
        # the expert path against two dots sharing A; H200, bench/RESULTS.md 2026-12-01).
        j = tl.arange(0, 2 * BLOCK_N)
        offs_wr = (pid_n * BLOCK_N + j // 2) % F + (j % 2) * F  # weight row of each column
        NB: tl.constexpr = 2 * BLOCK_N
    else:
        offs_wr = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % F  # wrapped columns: not stored
        NB: tl.constexpr = BLOCK_N
    b_ptrs = w_e + offs_wr[None, :] * KW + offs_kw[:, None]  # [BKW, NB] view of W.T
    acc = tl.zeros([BLOCK_M, NB], dtype=tl.float32)
    if FOLD_M > 0:
        # The fold's rows, transposed (weight columns x rows): a dot of FOLD_M < 64 rows cannot
        # run as Hopper's warp-group MMA (64 rows per warp group), its transpose can.
        acc_f = tl.zeros([NB, FOLD_M], dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < H - k * BLOCK_K)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=(offs_kw < KW - k * BKW)[:, None], other=0.0)
        wt = weight_tile(b, a.dtype, W_INT4)
        acc = tl.dot(a, wt, acc)
        if FOLD_M > 0:
            acc_f = _fold_step(acc_f, wt, f_ptrs, k, offs_k, H, BLOCK_K, EVEN_K)
            f_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        b_ptrs += BKW
    _up_store(
        acc, offs_m, offs_wr, pid_n, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit,
        alpha, gate_cap, up_cap, F, ACT, FORM, HAS_BIAS, W_SCALED, WEIGHT_ON_INPUT, STORE_GU,
        BLOCK_N,
    )  # fmt: skip
    if FOLD_M > 0:
        _up_store(
            tl.trans(acc_f), offs_f, offs_wr, pid_n, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr,
            gu_ptr, N, limit, alpha, gate_cap, up_cap, F, ACT, FORM, HAS_BIAS, W_SCALED,
            WEIGHT_ON_INPUT, STORE_GU, BLOCK_N,
        )  # fmt: skip


@triton.jit
def _token_rows(sorted_ptr, offs_m, N, TOPK: tl.constexpr):
    """x's row of each padded row (int64): its slot's token; padding rows read token 0 (never
    stored)."""
    slot = tl.load(sorted_ptr + offs_m)
    return tl.where(slot < N, slot // TOPK, 0).to(tl.int64)


@triton.jit
def _up_store(
    acc, offs_m, offs_wr, pid_n, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, h_ptr, gu_ptr, N, limit,
    alpha, gate_cap, up_cap, F: tl.constexpr, ACT: tl.constexpr, FORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr,
    STORE_GU: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The up GEMM's epilogue for rows offs_m (acc's columns are weight rows offs_wr): scales,
    routing weight, bias, GLU; store h (and the pre-activations by slot)."""
    GLU: tl.constexpr = FORM != "none"
    X: tl.constexpr = 2 * F if GLU else F
    BLOCK_M: tl.constexpr = acc.shape[0]
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if W_SCALED:  # x (q * s).T == (x q.T) * s: one scale per weight row, i.e. per column here
        acc = acc * tl.load(s_ptr + e * X + offs_wr)[None, :]
    if WEIGHT_ON_INPUT:  # (w x) W.T == w (x W.T): scale the rows before the bias
        acc = acc * tl.load(rw_ptr + slot, mask=row_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * X + offs_wr).to(tl.float32)[None, :]
    if GLU:
        acc_g, acc_u = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    else:
        acc_g, acc_u = acc, acc  # glu() ignores u without a GLU
    store_ok = row_ok[:, None] & (offs_n < F)[None, :]
    if STORE_GU:  # gate at columns [0, F), up at [F, 2F) of the slot's row
        gu_ptrs = gu_ptr + slot[:, None].to(tl.int64) * X + offs_n[None, :]
        tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=store_ok)
        if GLU:
            tl.store(gu_ptrs + F, acc_u.to(gu_ptr.dtype.element_ty), mask=store_ok)
    h = glu(acc_g, acc_u, limit, alpha, gate_cap, up_cap, ACT, FORM)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * F + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=store_ok)


@triton.jit
def _down_kernel(
    h_ptr,  # [P, F]
    w_ptr,  # [E, H, F]
    b_ptr,  # [E, H]  (if HAS_BIAS)
    s_ptr,  # [E, H] float32 scale of each weight row (if W_SCALED)
    rw_ptr,  # [N] float32 routing weights (if MUL_WEIGHT)
    sorted_ptr,  # [P] int32
    eob_ptr,  # [B] int32
    off_ptr,  # [E + 1] int32
    out_ptr,  # [N, H] out, slot order
    N,
    num_blocks_m,
    H: tl.constexpr,
    F: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_SCALED: tl.constexpr,
    W_INT4: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    ALIGN_M: tl.constexpr,
    TAIL_M: tl.constexpr,
    FOLD_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n, e = _tile_ids(
        eob_ptr, off_ptr, sorted_ptr, N, H, BLOCK_N, GROUP_M, ALIGN_M, BLOCK_M
    )
    if e < 0:
        return
    fold = 0  # as in _up_kernel
    if FOLD_M > 0:
        fold = _fold_rows(pid_m, num_blocks_m, eob_ptr, sorted_ptr, N, e, BLOCK_M, FOLD_M)
    if fold > 0:
        _down_tile(
            h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n, e,
            H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, BLOCK_M, BLOCK_N, BLOCK_K, FOLD_M,
        )  # fmt: skip
    elif fold == 0:
        _down_block(
            h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m, pid_n, e, H, F,
            HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, TAIL_M, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _down_block(
    h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m, pid_n, e, H: tl.constexpr,
    F: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, W_INT4: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Row block pid_m of expert e, in the tile its slots need (as ``_up_block``)."""
    if TAIL_M > 0:
        rows = _block_rows(pid_m, sorted_ptr, N, BLOCK_M)
        if rows <= TAIL_M:
            _down_tile(
                h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n,
                e, H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, TAIL_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        elif TAIL_M == BLOCK_M // 2:
            _down_tile(
                h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n,
                e, H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        elif rows <= BLOCK_M // 2:
            _down_tile(
                h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n,
                e, H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, BLOCK_M // 2, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        else:
            _down_tile(
                h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n,
                e, H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
    else:
        _down_tile(
            h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, pid_m * BLOCK_M, pid_n, e,
            H, F, HAS_BIAS, W_SCALED, W_INT4, MUL_WEIGHT, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _down_tile(
    h_ptr, w_ptr, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, row0, pid_n, e, H: tl.constexpr,
    F: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, W_INT4: tl.constexpr,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FOLD_M: tl.constexpr = 0,
):  # fmt: skip
    """Rows [row0, row0 + BLOCK_M) x output columns pid_n of the down GEMM, all of expert e; with
    FOLD_M > 0 also the FOLD_M rows after them (the expert's last few), from the same weight tiles.
    """
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_wn = offs_n % H
    offs_k = tl.arange(0, BLOCK_K)
    KW: tl.constexpr = F // 2 if W_INT4 else F  # stored weight row length (int4: 2 per byte)
    BKW: tl.constexpr = BLOCK_K // 2 if W_INT4 else BLOCK_K
    offs_kw = tl.arange(0, BKW)
    # Padding rows of h were never written: they are read (unmasked, cheaper) but never stored.
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * F + offs_k[None, :]
    w_ptrs = w_ptr + e.to(tl.int64) * (H * KW) + offs_wn[None, :] * KW + offs_kw[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FOLD_M > 0:
        offs_f = row0 + BLOCK_M + tl.arange(0, FOLD_M)
        f_ptrs = h_ptr + offs_f[:, None].to(tl.int64) * F + offs_k[None, :]
        acc_f = tl.zeros([BLOCK_N, FOLD_M], dtype=tl.float32)  # transposed: see _up_tile
    EVEN_K: tl.constexpr = F % BLOCK_K == 0
    for k in range(0, tl.cdiv(F, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = offs_k < F - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=(offs_kw < KW - k * BKW)[:, None], other=0.0)
        wt = weight_tile(b, a.dtype, W_INT4)
        acc = tl.dot(a, wt, acc)
        if FOLD_M > 0:
            acc_f = _fold_step(acc_f, wt, f_ptrs, k, offs_k, F, BLOCK_K, EVEN_K)
            f_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BKW
    _down_store(
        acc, offs_m, offs_n, offs_wn, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N, H,
        HAS_BIAS, W_SCALED, MUL_WEIGHT,
    )  # fmt: skip
    if FOLD_M > 0:
        _down_store(
            tl.trans(acc_f), offs_f, offs_n, offs_wn, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr,
            N, H, HAS_BIAS, W_SCALED, MUL_WEIGHT,
        )  # fmt: skip


@triton.jit
def _down_store(
    acc, offs_m, offs_n, offs_wn, e, b_ptr, s_ptr, rw_ptr, sorted_ptr, out_ptr, N,
    H: tl.constexpr, HAS_BIAS: tl.constexpr, W_SCALED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
):  # fmt: skip
    """The down GEMM's epilogue for rows offs_m: scales, bias, routing weight; store by slot."""
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < N
    if W_SCALED:
        acc = acc * tl.load(s_ptr + e * H + offs_wn)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + e * H + offs_wn).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(rw_ptr + slot, mask=row_ok, other=0.0)[:, None]
    o_ptrs = out_ptr + slot[:, None].to(tl.int64) * H + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_n < H)[None, :])


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
# (kernel, tiles asked for, activation and weight dtypes, GLU form) -> the tiles that compiled
_FITTED: dict[tuple, GemmConfig] = {}

# Row blocks of at least this many rows run an expert's last block, when it holds at most half a
# block of slots, as a half-height tile: at ~128 slots per expert (DeepSeek-V3, T=4096) about half
# the experts end in a block of a few slots, and a full-height tile multiplies ~46% padding rows.
TAIL_MIN_BLOCK_M = 128


def _tail_m(c: GemmConfig) -> int:
    """TAIL_M of the kernels: the rows of the smallest tile for a block's last few slots (half a
    block, or a quarter with ``tail_div`` 4), 0 = no such tile."""
    return 0 if c.block_m < TAIL_MIN_BLOCK_M else c.block_m // c.tail_div


def _fold_m(c: GemmConfig, align_m: int) -> int:
    """FOLD_M of the kernels: ``fold_m`` where this GEMM's row blocks are the alignment's (so
    block i is expert eob[i]'s) and taller than the fold, else 0 (no fold)."""
    return c.fold_m if c.block_m == align_m and c.fold_m < c.block_m else 0


def _launch(kernel, grid: tuple, config: GemmConfig, key: tuple, *args, **constexprs) -> None:
    """``kernel[grid](*args, **constexprs)`` with ``config``'s tiles; where they need more shared
    memory than this GPU has (a table tuned on an H100 run on an A100's 163 KB, say), with one
    pipeline stage fewer at a time (down to 2), then half the K tile (down to 32). The first tiles
    that compile are remembered for ``key``. The grid does not depend on what changes."""
    key = (kernel.fn.__name__, config) + key
    c = _FITTED.get(key, config)
    while True:
        try:
            launch(
                kernel, grid, *args, **constexprs, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                BLOCK_K=c.block_k, GROUP_M=c.group_m, num_warps=c.num_warps,
                num_stages=c.num_stages,
            )  # fmt: skip
            _FITTED[key] = c
            return
        except OutOfResources:
            if c.num_stages > 2:
                c = replace(c, num_stages=c.num_stages - 1)
            elif c.block_k > 32:
                c = replace(c, block_k=c.block_k // 2)
            else:
                raise


def _blocks(sorted_slot_ids_P: torch.Tensor, expert_of_block_B: torch.Tensor, c: GemmConfig):
    """(row blocks of this GEMM, the block size the slots were aligned to)."""
    P, B = sorted_slot_ids_P.numel(), expert_of_block_B.numel()
    align_m = P // B
    assert align_m % c.block_m == 0, f"block_m {c.block_m} must divide the alignment {align_m}"
    return P // c.block_m, align_m


def up_proj(
    x_TH: torch.Tensor,
    w_up_EXH: torch.Tensor,
    b_up_EX: torch.Tensor | None,
    topk_weights_N: torch.Tensor | None,
    sorted_slot_ids_P: torch.Tensor,
    expert_of_block_B: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    top_k: int,
    config: GemmConfig,
    activation: str = "silu",
    glu_form: str = "standard",
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
    w_up_scale_EX: torch.Tensor | None = None,
    gu_out_NX: torch.Tensor | None = None,
) -> torch.Tensor:
    """h_PF: the expert activations of every padded row (padding rows left unwritten).

    ``w_up_EXH`` is [E, 2F, H] (gate rows then up rows) for a GLU form, [E, F, H] for
    ``glu_form="none"``; with ``w_up_scale_EX`` (float32, one scale per row) weight-only int8
    (int8), fp8 (float8_e4m3fn) or int4 (uint8 [E, X, H // 2], two values per byte along H, low
    nibble first, value = nibble - 8). ``topk_weights_N`` (float32 [T*K]) given = weight on input.
    ``gu_out_NX`` ([T*K, X], x's dtype) given: each slot's pre-activations (with bias, before the
    GLU; gate columns then up) are also written to its row, for the backward; rows of slots not
    in this group are left unwritten.
    """
    T, H = x_TH.shape
    E, X, _ = w_up_EXH.shape
    F = X // 2 if glu_form != "none" else X
    int4 = w_up_EXH.dtype == torch.uint8
    num_m, align_m = _blocks(sorted_slot_ids_P, expert_of_block_B, config)
    h = torch.empty(sorted_slot_ids_P.numel(), F, dtype=x_TH.dtype, device=x_TH.device)
    _launch(
        _up_kernel, (num_m * cdiv(F, config.block_n),), config,
        (x_TH.dtype, w_up_EXH.dtype, glu_form),
        x_TH, w_up_EXH, b_up_EX if b_up_EX is not None else w_up_EXH,
        w_up_scale_EX if w_up_scale_EX is not None else x_TH,
        topk_weights_N if topk_weights_N is not None else x_TH,
        sorted_slot_ids_P, expert_of_block_B, expert_offsets_E1, h,
        gu_out_NX if gu_out_NX is not None else h,
        T * top_k, num_m,
        float(limit), float(alpha), float(gate_softcap), float(up_softcap),
        H=H, F=F, TOPK=top_k, ACT=activation, FORM=glu_form, HAS_BIAS=b_up_EX is not None,
        W_SCALED=w_up_scale_EX is not None, W_INT4=int4,
        WEIGHT_ON_INPUT=topk_weights_N is not None, STORE_GU=gu_out_NX is not None, ALIGN_M=align_m,
        TAIL_M=_tail_m(config), FOLD_M=_fold_m(config, align_m),
    )  # fmt: skip
    return h


def down_proj(
    h_PF: torch.Tensor,
    w_down_EHF: torch.Tensor,
    b_down_EH: torch.Tensor | None,
    topk_weights_N: torch.Tensor | None,
    sorted_slot_ids_P: torch.Tensor,
    expert_of_block_B: torch.Tensor,
    expert_offsets_E1: torch.Tensor,
    num_slots: int,
    config: GemmConfig,
    w_down_scale_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """o_NH: each slot's expert output (× its routing weight when ``topk_weights_N`` is given),
    in slot order. Rows of slots not in this group are left unwritten (``combine`` skips them).
    ``w_down_scale_EH``: float32 row scales of an int8 ``w_down_EHF`` (or int4: uint8 [E, H, F // 2],
    packed as in ``up_proj``)."""
    E, H, _ = w_down_EHF.shape
    F = h_PF.shape[1]
    num_m, align_m = _blocks(sorted_slot_ids_P, expert_of_block_B, config)
    o = torch.empty(num_slots, H, dtype=h_PF.dtype, device=h_PF.device)
    _launch(
        _down_kernel, (num_m * cdiv(H, config.block_n),), config,
        (h_PF.dtype, w_down_EHF.dtype),
        h_PF, w_down_EHF, b_down_EH if b_down_EH is not None else w_down_EHF,
        w_down_scale_EH if w_down_scale_EH is not None else h_PF,
        topk_weights_N if topk_weights_N is not None else h_PF,
        sorted_slot_ids_P, expert_of_block_B, expert_offsets_E1, o, num_slots, num_m,
        H=H, F=F, HAS_BIAS=b_down_EH is not None, W_SCALED=w_down_scale_EH is not None,
        W_INT4=w_down_EHF.dtype == torch.uint8, MUL_WEIGHT=topk_weights_N is not None,
        ALIGN_M=align_m, TAIL_M=_tail_m(config), FOLD_M=_fold_m(config, align_m),
    )  # fmt: skip
    return o
