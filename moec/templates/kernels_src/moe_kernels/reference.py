"""Plain-torch oracles for every kernel in this package.

Each function here computes what the Triton kernel of the same name computes, in vectorised torch,
with the straightforward algorithm (score, rank with ``torch.topk``, sort slots by expert, one matmul
per expert).  They are the reference the tests compare against, the CPU path of the custom ops, and
the recomputation the backward passes differentiate.

Shape legend: T tokens, H hidden, F expert width, E experts (of this group), K top-k,
N = T*K routing slots (slot n = t*K + k).
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid")
GLU_FORMS = ("standard", "clamp_then_act", "act_then_clamp", "gpt_oss", "softcap_sigmoid", "none")


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------
def score_fn(x: torch.Tensor, score: str, dim: int = -1) -> torch.Tensor:
    """Scores from logits: ``softmax`` over ``dim``, elementwise ``sigmoid`` or ``sqrtsoftplus``."""
    if score == "softmax":
        return torch.softmax(x, dim=dim)
    if score == "sigmoid":
        return torch.sigmoid(x)
    if score == "sqrtsoftplus":
        return torch.sqrt(F.softplus(x))
    raise ValueError(f"unknown score function {score!r}")


def normalize_weights(
    w_TK: torch.Tensor, norm: str, eps: float, clamp_min: float, p: float
) -> torch.Tensor:
    """Renormalise the k weights of each token: ``none``, ``sum`` or ``pnorm``."""
    if norm == "none":
        return w_TK
    if norm == "sum":
        return w_TK / (w_TK.sum(-1, keepdim=True).clamp_min(clamp_min) + eps)
    if norm == "pnorm":
        return w_TK / w_TK.abs().pow(p).sum(-1, keepdim=True).pow(1.0 / p)
    raise ValueError(f"unknown norm {norm!r}")


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
    """Token-choice routing. Returns ``(topk_ids_TK int32, topk_weights_TK float32)``.

    See ``routing.moe_routing`` for the meaning of every option.
    """
    key_TE = selection_key(logits_TE, selection_bias_E, score, topk_on)
    keep_TE = torch.ones_like(key_TE, dtype=torch.bool)
    if n_group > 1:
        keep_TE = group_keep_mask(key_TE, n_group, topk_group, group_score)
        fill = float("-inf") if group_masked_value == "-inf" else 0.0
        key_TE = key_TE.masked_fill(~keep_TE, fill)
    ids_TK = key_TE.topk(top_k, dim=-1).indices
    w_TK = routing_weights_from_ids(
        logits_TE, ids_TK, score, topk_on, keep_TE if weights_from_masked else None
    )
    w_TK = normalize_weights(w_TK, norm, norm_eps, norm_clamp_min, norm_p) * scale
    return ids_TK.to(torch.int32), w_TK


def group_keep_mask(
    key_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str
) -> torch.Tensor:
    """Bool [T, E]: experts in the ``topk_group`` best of ``n_group`` groups of each token."""
    T, E = key_TE.shape
    key_TGS = key_TE.view(T, n_group, E // n_group)
    if group_score == "top2_sum":
        gscore_TG = key_TGS.topk(2, dim=-1).values.sum(-1)
    else:
        gscore_TG = key_TGS.amax(-1)
    gidx = gscore_TG.topk(topk_group, dim=-1).indices
    gkeep_TG = torch.zeros_like(gscore_TG, dtype=torch.bool).scatter_(1, gidx, True)
    return gkeep_TG[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


def selection_key(
    logits_TE: torch.Tensor, selection_bias_E: torch.Tensor | None, score: str, topk_on: str
) -> torch.Tensor:
    """The (un-masked) ranking key: scores or logits, plus the selection bias."""
    x_TE = logits_TE.float()
    key_TE = x_TE if topk_on == "logits" else score_fn(x_TE, score)
    if selection_bias_E is not None:
        key_TE = key_TE + selection_bias_E.float()
    return key_TE


def routing_weights_from_ids(
    logits_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    score: str,
    topk_on: str,
    keep_TE: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable un-normalised weights of the selected experts (the selection is fixed).

    ``keep_TE`` (group-limited routing with weights from the masked scores): experts outside the
    kept groups weigh 0.
    """
    x_TE = logits_TE.float()
    ids = ids_TK.long()
    if topk_on == "logits":
        return score_fn(x_TE.gather(1, ids), score)
    s_TE = score_fn(x_TE, score)
    if keep_TE is not None:
        s_TE = s_TE.masked_fill(~keep_TE, 0.0)
    return s_TE.gather(1, ids)


# --------------------------------------------------------------------------------------------------
# Permutation / alignment
# --------------------------------------------------------------------------------------------------
class Alignment(NamedTuple):
    """Slots grouped by expert, each expert's segment padded to a multiple of ``block_m``.

    sorted_slot_ids_P: int32 [P] slot index t*K+k in expert-sorted order (stable: ascending slot
        within an expert); padding entries hold the sentinel N = T*K.
    expert_of_block_B: int32 [B] local expert of each block of ``block_m`` rows; -1 past the end.
    expert_offsets_E1: int32 [E+1] first padded row of each expert (exclusive prefix sum).
    counts_E: int32 [E] slots routed to each local expert.
    """

    sorted_slot_ids_P: torch.Tensor
    expert_of_block_B: torch.Tensor
    expert_offsets_E1: torch.Tensor
    counts_E: torch.Tensor


def max_padded_rows(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded row count, known without reading the ids (no host sync)."""
    rows = num_slots + min(num_slots, num_experts) * (block_m - 1)
    return max(block_m, math.ceil(rows / block_m) * block_m)


def align_by_expert(
    topk_ids_TK: torch.Tensor, num_experts: int, block_m: int, first_expert_id: int = 0
) -> Alignment:
    """Oracle of ``permute.align_by_expert``. Ids outside [first, first+E) or -1 are skipped."""
    N = topk_ids_TK.numel()
    dev = topk_ids_TK.device
    e_N = topk_ids_TK.reshape(-1).long() - first_expert_id
    valid = (topk_ids_TK.reshape(-1) >= 0) & (e_N >= 0) & (e_N < num_experts)
    counts = torch.bincount(e_N[valid], minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    offsets[1:] = padded.cumsum(0)
    P = max_padded_rows(N, num_experts, block_m)
    sorted_ids = torch.full((P,), N, dtype=torch.int32, device=dev)
    slots = torch.nonzero(valid).flatten()
    order = torch.argsort(e_N[slots], stable=True)
    slots, e_sorted = slots[order], e_N[slots][order]
    rank = torch.arange(len(slots), device=dev) - (counts.cumsum(0) - counts)[e_sorted]
    sorted_ids[offsets[e_sorted] + rank] = slots.to(torch.int32)
    B = P // block_m
    block_start = torch.arange(B, device=dev) * block_m
    eob = torch.searchsorted(offsets[1:], block_start, right=True)
    eob = torch.where(block_start < offsets[-1], eob, -1)
    return Alignment(
        sorted_ids, eob.to(torch.int32), offsets.to(torch.int32), counts.to(torch.int32)
    )


# --------------------------------------------------------------------------------------------------
# Expert MLPs
# --------------------------------------------------------------------------------------------------
def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Elementwise activation by name (``ACTIVATIONS``)."""
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "relu2":
        return F.relu(x).square()
    if name == "sigmoid":
        return torch.sigmoid(x)
    raise ValueError(f"unknown activation {name!r}")


def glu(
    g: torch.Tensor,
    u: torch.Tensor | None,
    act: str,
    form: str,
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
) -> torch.Tensor:
    """The expert nonlinearity on gate ``g`` and up ``u`` pre-activations (``u`` None for "none")."""
    if form == "none":
        return activation(g, act)
    if form == "standard":
        return activation(g, act) * u
    if form == "clamp_then_act":
        return activation(g.clamp(max=limit), act) * u.clamp(-limit, limit)
    if form == "act_then_clamp":
        return activation(g, act).clamp(max=limit) * u.clamp(-limit, limit)
    if form == "gpt_oss":
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
    if form == "softcap_sigmoid":
        gc, uc = gate_softcap, up_softcap
        return gc * torch.tanh(g / gc) * torch.sigmoid(g) * uc * torch.tanh(u / uc)
    raise ValueError(f"unknown glu form {form!r}")


def expert_mlp(
    x_MH: torch.Tensor,
    w_up_XH: torch.Tensor,
    w_down_HF: torch.Tensor,
    b_up_X: torch.Tensor | None,
    b_down_H: torch.Tensor | None,
    act: str,
    form: str,
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
) -> torch.Tensor:
    """One expert on its rows: ``down(glu(x @ w_up.T + b_up)) + b_down``; X = 2F (GLU) or F."""
    gu = F.linear(x_MH, w_up_XH, b_up_X)
    if form == "none":
        g, u = gu, None
    else:
        g, u = gu.chunk(2, dim=-1)
    h = glu(g, u, act, form, limit, alpha, gate_softcap, up_softcap)
    return F.linear(h, w_down_HF, b_down_H)


def sort_slots(topk_ids_TK: torch.Tensor, num_experts: int, first_expert_id: int = 0):
    """The slots (t·K + k) routed to local experts [0, E) of the group starting at
    ``first_expert_id``, in expert order (stable: ascending slot within an expert)
    -> (slot_N, expert_N local ids, counts_E)."""
    e_S = topk_ids_TK.reshape(-1).long() - first_expert_id
    valid_S = (topk_ids_TK.reshape(-1) >= 0) & (e_S >= 0) & (e_S < num_experts)
    slot_N = torch.nonzero(valid_S).flatten()
    slot_N = slot_N[torch.argsort(e_S[slot_N], stable=True)]
    e_N = e_S[slot_N]
    return slot_N, e_N, torch.bincount(e_N, minlength=num_experts)


def dequantize(q: torch.Tensor, scale_R: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weight rows ``q[..., r, :] * scale_R[..., r]`` in ``dtype``. ``q`` is int8, or int4 packed
    two per byte along the last dimension (uint8: low nibble = even column, value = nibble - 8)."""
    if q.dtype == torch.uint8:
        low, high = (q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
        q = torch.stack([low, high], dim=-1).flatten(-2)
    return (q.float() * scale_R.float().unsqueeze(-1)).to(dtype)


def moe_experts(
    x_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w_up_EXH: torch.Tensor,
    w_down_EHF: torch.Tensor,
    b_up_EX: torch.Tensor | None = None,
    b_down_EH: torch.Tensor | None = None,
    first_expert_id: int = 0,
    activation: str = "silu",
    glu_form: str = "standard",
    limit: float = 0.0,
    alpha: float = 1.702,
    gate_softcap: float = 1.0,
    up_softcap: float = 1.0,
    weight_on_input: bool = False,
    w_up_scale_EX: torch.Tensor | None = None,
    w_down_scale_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y_TH = Σ_k w_tk · expert_{id_tk}(x_t)`` over the slots whose id is in [first, first+E).

    With ``weight_on_input`` the weight scales the expert input instead: ``expert(w_tk · x_t)``.
    With scales the weights are int8 or packed int4 rows times float32 scales (weight-only
    quantisation, see ``dequantize``), dequantised to x's dtype here. Differentiable in x, the routing weights and every float weight and bias.
    """
    if w_up_scale_EX is not None:
        w_up_EXH = dequantize(w_up_EXH, w_up_scale_EX, x_TH.dtype)
    if w_down_scale_EH is not None:
        w_down_EHF = dequantize(w_down_EHF, w_down_scale_EH, x_TH.dtype)
    T, H = x_TH.shape
    K = topk_ids_TK.shape[1]
    E = w_up_EXH.shape[0]
    slots, _, counts = sort_slots(topk_ids_TK, E, first_expert_id)
    counts = counts.tolist()
    tok = slots // K
    rw = topk_weights_TK.reshape(-1)[slots].float()[:, None]
    xs = x_TH[tok]
    if weight_on_input:
        xs = (xs.float() * rw).to(x_TH.dtype)
    # One unbind per tensor, not w[e] per expert: the backward of w[e] writes a zero-filled copy
    # of the whole [E, ...] tensor per expert (E x its size); unbind's stacks the experts' once.
    w_up, w_down = w_up_EXH.unbind(0), w_down_EHF.unbind(0)
    b_up = (None,) * E if b_up_EX is None else b_up_EX.unbind(0)
    b_down = (None,) * E if b_down_EH is None else b_down_EH.unbind(0)
    outs = []
    for e, rows in enumerate(torch.split(xs, counts)):
        if len(rows):
            outs.append(
                expert_mlp(
                    rows, w_up[e], w_down[e], b_up[e], b_down[e], activation, glu_form,
                    limit, alpha, gate_softcap, up_softcap,
                )
            )  # fmt: skip
    y_TH = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    if outs:
        o = torch.cat(outs).float()
        if not weight_on_input:
            o = o * rw
        y_TH = y_TH.index_add(0, tok, o)
    return y_TH.to(x_TH.dtype)
