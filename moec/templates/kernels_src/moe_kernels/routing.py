"""Fused token-choice routing: logits → scores → (bias, groups) → top-k → renorm → scale.

One Triton program handles ``BLOCK_T`` tokens with all E logits of each token in registers, so the
whole router after its GEMM is a single launch. Every option is a ``tl.constexpr``: a generated
package compiles exactly one specialisation.

Shape legend: T tokens, E experts, K top-k.
"""

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_power_of_2
from .launch import launch

SCORES = ("softmax", "sigmoid", "sqrtsoftplus")
NORMS = ("none", "sum", "pnorm")
# A finite stand-in for a group-masked "-inf": still ranks below every real score, but above the
# taken/padding columns (true -inf), so top-k never picks a column twice even when K exceeds the
# experts left in the kept groups.
_MASKED_NEG = tl.constexpr(-3.0e38)


@triton.jit
def _score(x, SCORE: tl.constexpr):
    """Elementwise score function (softmax is done by the caller, over a masked row)."""
    if SCORE == "sigmoid":
        return tl.sigmoid(x)
    else:  # sqrtsoftplus; softplus(x) = max(x, 0) + log(1 + exp(-|x|)), stable for large |x|
        return tl.sqrt(tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _routing_kernel(
    logits_ptr,  # [T, E] any float dtype, row stride stride_t
    bias_ptr,  # [E] float32 selection bias (read only if HAS_BIAS)
    ids_ptr,  # [T, K] int32 out
    weights_ptr,  # [T, K] float32 out
    T,
    stride_t,
    norm_eps,
    norm_clamp_min,
    norm_p,
    scale,
    E: tl.constexpr,
    K: tl.constexpr,
    E_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    SCORE: tl.constexpr,
    TOPK_ON_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_TOP2: tl.constexpr,
    MASK_ZERO: tl.constexpr,
    WEIGHTS_FROM_MASKED: tl.constexpr,
    NORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    x = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))

    # Scores s (what the weights are made of) and the ranking key.
    if TOPK_ON_LOGITS:
        s = x
    elif SCORE == "softmax":
        p = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = p / tl.sum(p, axis=1)[:, None]
    else:
        s = _score(x, SCORE)
    key = s
    if HAS_BIAS:
        key = key + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    key = tl.where(col_ok[None, :], key, float("-inf"))

    # Group-limited selection: keep the TOPK_GROUP best groups (score = max or sum of top-2).
    if N_GROUP > 1:
        GS: tl.constexpr = E // N_GROUP
        gid = cols // GS
        gkey = tl.full([BLOCK_T, E_PAD], float("-inf"), tl.float32)  # each expert's group score
        for g in tl.static_range(N_GROUP):
            in_g = (gid == g)[None, :] & col_ok[None, :]
            kg = tl.where(in_g, key, float("-inf"))
            best = tl.max(kg, axis=1)
            if GROUP_TOP2:
                first = tl.argmax(kg, axis=1)
                best += tl.max(tl.where(cols[None, :] == first[:, None], float("-inf"), kg), axis=1)
            gkey = tl.where(in_g, best[:, None], gkey)
        keep = tl.zeros([BLOCK_T, E_PAD], tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            bg = tl.argmax(gkey, axis=1) // GS
            sel = gid[None, :] == bg[:, None]
            keep = keep | sel.to(tl.int32)
            gkey = tl.where(sel, float("-inf"), gkey)
        keep = keep != 0
        if MASK_ZERO:
            key = tl.where(keep | ~col_ok[None, :], key, 0.0)
        else:
            key = tl.where(keep | ~col_ok[None, :], key, _MASKED_NEG)
        if WEIGHTS_FROM_MASKED:
            s = tl.where(keep, s, 0.0)

    # Top-k by repeated arg-max; the chosen column is then taken out with -inf.
    kcols = tl.arange(0, K_PAD)
    ids = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    vals = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for k in tl.static_range(K):
        j = tl.argmax(key, axis=1)
        hit = cols[None, :] == j[:, None]
        v = tl.sum(tl.where(hit, s, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == k, j[:, None], ids)
        vals = tl.where(kcols[None, :] == k, v[:, None], vals)
        key = tl.where(hit, float("-inf"), key)

    k_ok = (kcols < K)[None, :]
    if TOPK_ON_LOGITS:  # score only the k selected logits
        if SCORE == "softmax":
            vk = tl.where(k_ok, vals, float("-inf"))
            p = tl.exp(vk - tl.max(vk, axis=1)[:, None])
            w = p / tl.sum(p, axis=1)[:, None]
        else:
            w = _score(vals, SCORE)
    else:
        w = vals
    w = tl.where(k_ok, w, 0.0)
    if NORM == "sum":
        w = w / (tl.maximum(tl.sum(w, axis=1), norm_clamp_min) + norm_eps)[:, None]
    elif NORM == "pnorm":  # |w|^p through exp/log: log(0) = -inf gives 0, as pow does
        n = tl.sum(tl.exp(norm_p * tl.log(tl.abs(w))), axis=1)
        w = w / tl.exp(tl.log(n) / norm_p)[:, None]
    w = w * scale

    out = rows[:, None] * K + kcols[None, :]
    mask = row_ok[:, None] & k_ok
    tl.store(ids_ptr + out, ids, mask=mask)
    tl.store(weights_ptr + out, w, mask=mask)


def moe_routing(
    logits_TE: torch.Tensor,
    top_k: int,
    selection_bias_E: torch.Tensor | None = None,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route T tokens to their top-k of E experts in one launch (no autograd; see ``ops``).

    Args:
        logits_TE: [T, E] router logits (any float dtype; computed in float32).
        top_k: K, experts per token.
        selection_bias_E: [E] optional bias added to the ranking key only (to the scores, or to the
            logits when ``topk_on="logits"``); the weights use the unbiased values.
        score: ``softmax`` (over all E, or over the k when ``topk_on="logits"``) | ``sigmoid`` |
            ``sqrtsoftplus`` (sqrt(softplus(x))).
        topk_on: ``scores`` (score all experts, then rank) | ``logits`` (rank raw logits, then score
            only the k selected).
        n_group, topk_group: group-limited selection (E divisible by n_group): keep the topk_group
            best of n_group groups; 1 / 1 disables it.
        group_score: ``top2_sum`` (sum of a group's two best keys) | ``max``.
        group_masked_value: ``-inf`` | ``0``: the key given to experts of dropped groups.
        weights_from_masked: experts of dropped groups weigh 0 (DeepSeek-V2) instead of their score.
        norm: ``none`` | ``sum``: w / (max(Σw, norm_clamp_min) + norm_eps) | ``pnorm``: w / ‖w‖_p.
        scale: routed scaling factor, applied after the renorm.

    Returns:
        (topk_ids_TK int32, topk_weights_TK float32). The selected set matches ``torch.topk`` on
        inputs without ties; the order within a token is by decreasing key.
    """
    assert score in SCORES and norm in NORMS and topk_on in ("scores", "logits")
    assert group_score in ("top2_sum", "max") and group_masked_value in ("-inf", "0")
    T, E = logits_TE.shape
    assert 1 <= top_k <= E and E % n_group == 0 and topk_group <= n_group
    if n_group > 1 and group_score == "top2_sum":
        assert E // n_group >= 2, "top2_sum group scores need >= 2 experts per group"
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits_TE.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    if T == 0:
        return ids, weights
    bias = selection_bias_E.float().contiguous() if selection_bias_E is not None else weights
    E_PAD = next_power_of_2(E)
    BLOCK_T = max(1, min(64, 4096 // E_PAD))  # ~4K live scores per program
    launch(
        _routing_kernel, (cdiv(T, BLOCK_T),), logits_TE, bias, ids, weights, T, logits_TE.stride(0),
        float(norm_eps), float(norm_clamp_min), float(norm_p), float(scale),
        E=E, K=top_k, E_PAD=E_PAD, K_PAD=next_power_of_2(top_k), BLOCK_T=BLOCK_T,
        SCORE=score, TOPK_ON_LOGITS=topk_on == "logits", HAS_BIAS=selection_bias_E is not None,
        N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_TOP2=group_score == "top2_sum",
        MASK_ZERO=group_masked_value == "0", WEIGHTS_FROM_MASKED=weights_from_masked,
        NORM=norm, num_warps=4,
    )  # fmt: skip
    return ids, weights
