"""The Triton MoE kernels against their plain-torch oracles, on CPU under TRITON_INTERPRET=1.

Shapes are tiny and odd (H=40, F=24, E=5) because the interpreter runs every program in numpy;
the whole file stays well under a minute. bf16 is not covered here (broken in the interpreter):
tests/gpu/test_moe_kernels_gpu.py checks it on CUDA.
"""

import os
import sys
from pathlib import Path
from unittest import mock

# Triton picks the interpreter when a kernel is decorated (at import): tests/conftest.py turns it on
# for the whole CPU test run; set it here too so this file also runs on its own.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "moec/templates/kernels_src"))

import moe_kernels as mk  # noqa: E402
from moe_kernels import backward, backward_rows, permute, reference, routing  # noqa: E402
from moe_kernels.configs import GemmConfig, MoeConfig  # noqa: E402
from moe_kernels.grouped_gemm import _tile_ids  # noqa: E402

# numpy warns about log(0) on masked lanes and NaN in never-stored padding rows.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Small tiles so the interpreter runs few programs; partial and wrapped tiles. In CFG_MIXED the slots
# are aligned to 32 rows and the down GEMM runs 16-row blocks, skipping the all-padding ones.
CFG = MoeConfig(GemmConfig(16, 16, 16, 2, 4, 1), GemmConfig(16, 32, 16, 1, 4, 1))
CFG_MIXED = MoeConfig(GemmConfig(32, 32, 32, 1, 4, 1), GemmConfig(16, 16, 32, 4, 4, 1))
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sorted_by_id(ids, w):
    ids_s, order = ids.sort(dim=1)
    return ids_s, w.gather(1, order)


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------
ROUTING_CASES = {
    "softmax_k1": dict(E=5, K=1),
    "softmax_sum": dict(E=8, K=2, norm="sum"),
    "sigmoid_bias_groups_v3": dict(
        E=16, K=4, score="sigmoid", bias=True, n_group=4, topk_group=2, norm="sum",
        norm_eps=1e-20, scale=2.5,
    ),
    "softmax_groups_max_zero_v2": dict(
        E=12, K=3, n_group=4, topk_group=2, group_score="max", group_masked_value="0",
        weights_from_masked=True, scale=1.5,
    ),
    "sqrtsoftplus_bias": dict(E=7, K=3, score="sqrtsoftplus", bias=True, norm="sum", norm_eps=1e-20),
    "softmax_clamp_min": dict(E=6, K=2, norm="sum", norm_clamp_min=1e-12),
    "pnorm": dict(E=9, K=4, norm="pnorm", norm_p=2.0),
    "logits_softmax": dict(E=10, K=4, topk_on="logits"),
    "logits_sigmoid_llama4": dict(E=5, K=1, topk_on="logits", score="sigmoid"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ROUTING_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routing(case, dtype):
    opts = dict(ROUTING_CASES[case])
    E, K = opts.pop("E"), opts.pop("K")
    g = torch.Generator().manual_seed(len(case))
    T = 19
    logits = torch.randn(T, E, generator=g).to(dtype)
    if opts.pop("bias", False):
        opts["selection_bias_E"] = torch.randn(E, generator=g) * 0.2
    ids, w = routing.moe_routing(logits, K, **opts)
    ids_r, w_r = reference.moe_routing(logits, K, **opts)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    ids, w = sorted_by_id(ids, w)
    ids_r, w_r = sorted_by_id(ids_r, w_r)
    assert torch.equal(ids, ids_r)
    torch.testing.assert_close(w, w_r, rtol=1e-5, atol=1e-6)


def test_routing_single_token_and_grad():
    logits = torch.randn(1, 8, dtype=torch.float64).float().requires_grad_()
    opts = dict(score="sigmoid", norm="sum", norm_eps=1e-20, scale=2.0)
    ids, w = mk.moe_routing(logits, 3, **opts)
    ids_r, w_r = reference.moe_routing(logits, 3, **opts)
    assert set(ids[0].tolist()) == set(ids_r[0].tolist())
    gw = torch.randn(1, 3)
    (g,) = torch.autograd.grad(w, logits, gw)
    (g_r,) = torch.autograd.grad(w_r, logits, gw)
    torch.testing.assert_close(g, g_r)


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "T,K,E,first,block_m,layout",
    [
        (13, 3, 5, 0, 16, "random"),  # odd sizes, dropped slots
        (1, 1, 5, 0, 16, "random"),  # one token
        (40, 2, 4, 0, 16, "one_expert"),  # all tokens on one expert, the others empty
        (300, 4, 6, 2, 32, "random"),  # several chunks; group [2, 8) of 10 experts
        (7, 8, 64, 0, 16, "random"),  # more experts than slots
        # from 64 experts slots are ranked by comparing them: several steps and chunks, a group
        # of the ids, every slot of a step on one expert
        (600, 8, 128, 0, 128, "random"),
        (300, 4, 70, 5, 32, "random"),
        (200, 8, 64, 0, 64, "one_expert"),
    ],
)
def test_align_by_expert(T, K, E, first, block_m, layout):
    g = torch.Generator().manual_seed(T)
    if layout == "one_expert":
        ids = torch.full((T, K), 2, dtype=torch.int32)
        ids[:, 1] = -1
    else:
        ids = torch.randint(-1, first + E + 2, (T, K), generator=g).int()
    got = permute.align_by_expert(ids, E, block_m, first)
    want = reference.align_by_expert(ids, E, block_m, first)
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert torch.equal(a, b), name


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 8),
    st.integers(1, 160),
    st.integers(0, 3),
    st.sampled_from([16, 32, 64, 128]),
    st.integers(0, 5),
    st.sampled_from([1, 3, 128]),
    st.integers(0, 2**31 - 1),
)
def test_align_by_expert_property(T, K, E, first, block_m, hot, max_chunks, seed):
    """Any routing, few experts (a [SUB, E] one-hot ranks the slots) or many (slots compared with
    each other), in one chunk or many, of one step or many: equal to the reference; ``hot`` > 0
    puts every slot on that many experts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, first + (hot or E + 2), (T, K), generator=g).int()
    with mock.patch.object(permute, "MAX_CHUNKS", max_chunks):
        got = permute.align_by_expert(ids, E, block_m, first)
    want = reference.align_by_expert(ids, E, block_m, first)
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# Experts forward
# --------------------------------------------------------------------------------------------------
def make_experts(T, H, F, E, K, dtype, glu_form="standard", bias=False, seed=0, id_hi=None):
    g = torch.Generator().manual_seed(seed)
    X = F if glu_form == "none" else 2 * F

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x = rnd(T, H)
    w_up = rnd(E, X, H, scale=H**-0.5)
    w_down = rnd(E, H, F, scale=F**-0.5)
    b_up = rnd(E, X) if bias else None
    b_down = rnd(E, H) if bias else None
    ids = torch.randint(-1, E if id_hi is None else id_hi, (T, K), generator=g).int()
    w = torch.rand(T, K, generator=g)
    return x, ids, w, w_up, w_down, b_up, b_down


def ref64(x, ids, w, w_up, w_down, b_up, b_down, **kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.moe_experts(d(x), ids, d(w), d(w_up), d(w_down), d(b_up), d(b_down), **kw)


GLU_CASES = [
    dict(glu_form="standard", activation=a)
    for a in ("silu", "gelu", "gelu_tanh", "relu", "relu2", "sigmoid")
] + [
    dict(glu_form="clamp_then_act", activation="silu", limit=1.0),
    dict(glu_form="act_then_clamp", activation="gelu", limit=0.5),
    dict(glu_form="gpt_oss", limit=1.5, alpha=1.702),
    dict(glu_form="softcap_sigmoid", gate_softcap=2.0, up_softcap=3.0),
    dict(glu_form="none", activation="relu2"),
]


@pytest.mark.parametrize("opts", GLU_CASES, ids=lambda o: f"{o['glu_form']}-{o.get('activation')}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_glu_forms(opts, dtype):
    bias = opts["glu_form"] in ("gpt_oss", "none")
    args = make_experts(11, 40, 24, 5, 3, dtype, opts["glu_form"], bias=bias, seed=len(str(opts)))
    y = mk.moe_experts_triton(*args, config=CFG, **opts)
    assert y.dtype == dtype and y.shape == (11, 40)
    assert rel_err(y, ref64(*args, **opts)) < TOL[dtype]


@pytest.mark.parametrize(
    "T,H,F,E,K,kw",
    [
        (1, 40, 24, 5, 1, {}),  # one token, k=1
        (17, 40, 24, 5, 4, dict(bias=True)),  # k>2 with biases
        (9, 32, 48, 3, 2, dict(weight_on_input=True)),  # Llama-4: weight on the input
        (21, 40, 24, 6, 2, dict(one_expert=True)),  # every token on one expert, others empty
        (5, 40, 24, 16, 2, {}),  # more experts than slots: most are empty
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_experts_shapes(T, H, F, E, K, kw, dtype):
    kw = dict(kw)
    x, ids, w, w_up, w_down, b_up, b_down = make_experts(
        T, H, F, E, K, dtype, bias=kw.pop("bias", False), seed=T
    )
    if kw.pop("one_expert", False):
        ids[:] = 3
        ids[::3, 1] = -1  # some dropped slots too
    args = (x, ids, w, w_up, w_down, b_up, b_down)
    cfg = CFG_MIXED if T > 16 else CFG
    y = mk.moe_experts_triton(*args, config=cfg, **kw)
    assert rel_err(y, ref64(*args, **kw)) < TOL[dtype]


@pytest.mark.parametrize(
    "cfg",
    [
        MoeConfig(GemmConfig(32, 16, 16, 2, 4, 1), GemmConfig(32, 32, 16, 1, 4, 1)),
        MoeConfig(GemmConfig(64, 16, 16, 2, 4, 1), GemmConfig(32, 16, 32, 4, 4, 1)),  # 2 per block
    ],
)
@pytest.mark.parametrize(
    "kw", [{}, dict(bias=True, glu_form="gpt_oss", limit=1.5), dict(weight_on_input=True)]
)
def test_experts_tail_tiles(monkeypatch, cfg, kw):
    """An expert's last block holding at most half a block of slots runs a half-height tile:
    equal to the reference, with experts ending in full blocks, in tails, and in both."""
    from moe_kernels import grouped_gemm

    monkeypatch.setattr(grouped_gemm, "TAIL_MIN_BLOCK_M", 32)
    kw = dict(kw)
    T, H, F, E, K = 45, 40, 24, 4, 2
    x, ids, w, w_up, w_down, b_up, b_down = make_experts(
        T, H, F, E, K, torch.float32, kw.get("glu_form", "standard"), kw.pop("bias", False), seed=5
    )
    ids[:40, 0] = 0  # expert 0: 40+ slots (a full block and a tail); the rest spread
    args = (x, ids, w, w_up, w_down, b_up, b_down)
    counts = torch.bincount(ids.flatten().clamp(min=0), minlength=E)
    tails = [c % cfg.up.block_m for c in counts.tolist()]
    assert any(0 < t <= cfg.up.block_m // 2 for t in tails), tails  # the tail tile runs
    assert any(t > cfg.up.block_m // 2 or t == 0 for t in tails), tails  # and the full one
    y = mk.moe_experts_triton(*args, config=cfg, **kw)
    assert rel_err(y, ref64(*args, **kw)) < TOL[torch.float32]


@pytest.mark.parametrize("kw", [{}, dict(weight_on_input=True)])
def test_experts_quarter_tail_tiles(monkeypatch, kw):
    """With ``tail_div`` 4, an expert's last block of at most a quarter block of slots runs a
    quarter-height tile, one of at most half a block a half-height one: equal to the reference with
    experts ending in each (74 slots = a full block and a quarter tail; 20 = half; 50 = full;
    5 = quarter) and one with none."""
    from moe_kernels import grouped_gemm

    monkeypatch.setattr(grouped_gemm, "TAIL_MIN_BLOCK_M", 64)
    up, down = GemmConfig(64, 16, 16, 2, 4, 1, tail_div=4), GemmConfig(
        64, 32, 16, 1, 4, 1, tail_div=4
    )
    assert grouped_gemm._tail_m(up) == 16 and grouped_gemm._tail_m(GemmConfig(32, 16, 16)) == 0
    H, F, E = 40, 24, 5
    x, _, _, w_up, w_down, _, _ = make_experts(149, H, F, E, 1, torch.float32, seed=9)
    ids = torch.tensor([0] * 74 + [1] * 20 + [2] * 50 + [3] * 5)[torch.randperm(149)][:, None]
    w = torch.rand(149, 1)
    cfg = MoeConfig(up, down)
    args = (x, ids, w, w_up, w_down, None, None)
    y = mk.moe_experts_triton(*args, config=cfg, **kw)
    assert rel_err(y, ref64(*args, **kw)) < TOL[torch.float32]


@triton.jit
def _tile_ids_probe(eob_ptr, off_ptr, sorted_ptr, out_ptr, N, N_OUT: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, ALIGN_M: tl.constexpr,
                    BLOCK_M: tl.constexpr):  # fmt: skip
    pid_m, pid_n, e = _tile_ids(
        eob_ptr, off_ptr, sorted_ptr, N, N_OUT, BLOCK_N, GROUP_M, ALIGN_M, BLOCK_M
    )
    pid = tl.program_id(0)
    tl.store(out_ptr + 3 * pid, pid_m)
    tl.store(out_ptr + 3 * pid + 1, pid_n)
    tl.store(out_ptr + 3 * pid + 2, e)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 70), min_size=1, max_size=6),
    align_m=st.sampled_from([8, 16]),
    split=st.sampled_from([1, 2]),
    group_m=st.sampled_from([1, 2, 3, 8]),
    num_n=st.integers(1, 3),
)
def test_tile_ids_cover_each_block_once_grouped_within_experts(
    counts, align_m, split, group_m, num_n
):
    """The GEMMs' program order: every (row block holding slots, output tile) pair exactly once,
    with its block's expert; each expert's programs a contiguous range of program ids, so that no
    group of blocks sharing weight tiles spans two experts; all-padding blocks skipped."""
    E, N = len(counts), sum(counts)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))[:, None].int()
    al = permute.align_by_expert(ids, E, align_m)
    block_m = align_m // split
    num_m = al.sorted_slot_ids_P.numel() // block_m
    out = torch.full((num_m * num_n, 3), -9, dtype=torch.int32)
    _tile_ids_probe[(num_m * num_n,)](
        al.expert_of_block_B, al.expert_offsets_E1, al.sorted_slot_ids_P, out, N,
        N_OUT=num_n * 4, BLOCK_N=4, GROUP_M=group_m, ALIGN_M=align_m, BLOCK_M=block_m,
    )  # fmt: skip
    rows = al.sorted_slot_ids_P.view(num_m, block_m)
    expected = {
        (m, n): al.expert_of_block_B[m * block_m // align_m].item()
        for m in range(num_m)
        if rows[m, 0] < N
        for n in range(num_n)
    }
    run = [tuple(r) for r in out.tolist() if r[2] >= 0]
    assert len(run) == len(expected)
    assert {(m, n): e for m, n, e in run} == expected
    experts = [e for _, _, e in run]
    assert experts == sorted(experts)  # each expert's programs contiguous, in expert order


FOLD_COUNTS = [74, 20, 80, 81, 5, 130, 64]  # slots per expert: see test_experts_folded_tails


@pytest.mark.parametrize("blocks", [(64, 64), (32, 64)], ids=["both_fold", "down_folds"])
@pytest.mark.parametrize("tail_div", [2, 4])
@pytest.mark.parametrize(
    "kw", [{}, dict(bias=True, glu_form="gpt_oss", limit=1.5), dict(weight_on_input=True)]
)
def test_experts_folded_tails(monkeypatch, blocks, tail_div, kw):
    """With ``fold_m`` 16 and 64-row blocks, an expert's last block of at most 16 slots after a
    full block is computed by the full block's program: 74 and 130 slots (10 and 2 folded), 80
    (16, the most a fold takes), 81 (17: a tail tile), 5 and 20 (one short block, nothing to fold
    into), 64 (a full block followed by another expert's). With up blocks of 32 rows the up GEMM's
    blocks are not the alignment's and it runs without the fold; the down GEMM folds."""
    from moe_kernels import grouped_gemm

    monkeypatch.setattr(grouped_gemm, "TAIL_MIN_BLOCK_M", 64)
    kw = dict(kw)
    up_m, down_m = blocks
    up = GemmConfig(up_m, 16, 16, 2, 4, 1, tail_div=tail_div, fold_m=16)
    down = GemmConfig(down_m, 32, 16, 1, 4, 1, tail_div=tail_div, fold_m=16)
    assert grouped_gemm._fold_m(down, 64) == 16
    assert grouped_gemm._fold_m(up, 64) == (16 if up_m == 64 else 0)
    H, F, E = 40, 24, len(FOLD_COUNTS)
    T = sum(FOLD_COUNTS)
    x, _, _, w_up, w_down, b_up, b_down = make_experts(
        T, H, F, E, 1, torch.float32, kw.get("glu_form", "standard"), kw.pop("bias", False), seed=9
    )
    g = torch.Generator().manual_seed(4)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(FOLD_COUNTS))
    ids = ids[torch.randperm(T, generator=g)][:, None]
    w = torch.rand(T, 1, generator=g)
    args = (x, ids, w, w_up, w_down, b_up, b_down)
    y = mk.moe_experts_triton(*args, config=MoeConfig(up, down), **kw)
    assert rel_err(y, ref64(*args, **kw)) < TOL[torch.float32]


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_experts_folded_tails_quantized(monkeypatch, bits):
    """The fold with weight-only quantised experts: the converted weight tile feeds both dots."""
    from moe_kernels import grouped_gemm

    monkeypatch.setattr(grouped_gemm, "TAIL_MIN_BLOCK_M", 64)
    cfg = MoeConfig(
        GemmConfig(64, 16, 16, 2, 4, 1, fold_m=16), GemmConfig(64, 32, 16, 1, 4, 1, 2, 16)
    )
    H, F, E = 40, 24, len(FOLD_COUNTS)
    T = sum(FOLD_COUNTS)
    x, _, _, w_up, w_down, _, _ = make_experts(T, H, F, E, 1, torch.float32, seed=9)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(FOLD_COUNTS))[:, None]
    w = torch.rand(T, 1, generator=torch.Generator().manual_seed(4))
    (q_up, s_up), (q_down, s_down) = QUANTIZE[bits](w_up), QUANTIZE[bits](w_down)
    y = mk.moe_experts_triton(
        x, ids, w, q_up, q_down, w_up_scale_EX=s_up, w_down_scale_EH=s_down, config=cfg
    )
    deq = [reference.dequantize(q, s, torch.float32) for q, s in ((q_up, s_up), (q_down, s_down))]
    assert rel_err(y, ref64(x, ids, w, *deq, None, None)) < TOL[torch.float32]


def test_up_proj_folded_tails_store_the_pre_activations():
    """The folded rows' pre-activations (kept for the backward) are written to their slots' rows,
    as the other rows' are: the same as without the fold."""
    from moe_kernels import grouped_gemm

    H, F, E = 40, 24, len(FOLD_COUNTS)
    T = sum(FOLD_COUNTS)
    x, _, _, w_up, _, b_up, _ = make_experts(T, H, F, E, 1, torch.float32, bias=True, seed=9)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(FOLD_COUNTS))
    ids = ids[torch.randperm(T, generator=torch.Generator().manual_seed(4))][:, None].int()
    al = permute.align_by_expert(ids, E, 64)
    out = {}
    for fold_m in (0, 16):
        gu = torch.full((T, 2 * F), float("nan"))
        c = GemmConfig(64, 16, 16, 2, 4, 1, fold_m=fold_m)
        h = grouped_gemm.up_proj(x, w_up, b_up, None, *al[:3], 1, c, gu_out_NX=gu)
        valid = al.sorted_slot_ids_P < T
        out[fold_m] = h[valid], gu
    torch.testing.assert_close(out[16][0], out[0][0])
    torch.testing.assert_close(out[16][1], out[0][1])
    assert not out[16][1].isnan().any()  # every slot's row written


def test_experts_default_config_fp32():
    args = make_experts(6, 40, 24, 5, 2, torch.float32, seed=3)
    assert rel_err(mk.moe_experts_triton(*args), ref64(*args)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_groups_different_widths(dtype):
    """Experts 0..3 have F=24 and 4..8 F=40; each group skips the other's ids; sums match."""
    T, H, K = 14, 40, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.randint(-1, 9, (T, K), generator=g).int()
    w = torch.rand(T, K, generator=g)
    groups = [(0, 4, 24), (4, 5, 40)]
    y = torch.zeros(T, H, dtype=torch.float64)
    y_ref = torch.zeros(T, H, dtype=torch.float64)
    for first, E, F in groups:
        w_up = (torch.randn(E, 2 * F, H, generator=g) * H**-0.5).to(dtype)
        w_down = (torch.randn(E, H, F, generator=g) * F**-0.5).to(dtype)
        args = (x, ids, w, w_up, w_down, None, None)
        y += mk.moe_experts_triton(*args, first_expert_id=first, config=CFG).double()
        y_ref += ref64(*args, first_expert_id=first)
    assert rel_err(y, y_ref) < TOL[dtype]


# --------------------------------------------------------------------------------------------------
# Experts through the custom op: forward and backward
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=True, glu_form="gpt_oss", limit=1.5),
        dict(weight_on_input=True, first_expert_id=1),
        dict(H=10),  # rows of 40 bytes: torch._grouped_mm declines, the oracle's vjp runs
        dict(weight_on_input=True, strided=True),  # x and ids strided views
    ],
    ids=["swiglu", "gpt_oss_bias", "weight_on_input_group", "unaligned_oracle", "strided_x"],
)
def test_experts_op_backward(kw):
    """Through the custom op (which keeps the pre-activations for the grouped-GEMM backward)
    against autograd through the float64 oracle."""
    kw = dict(kw)
    H, bias, strided = kw.pop("H", 40), kw.pop("bias", False), kw.pop("strided", False)
    args = make_experts(7, H, 24, 5, 3, torch.float32, bias=bias, seed=11)
    x, ids, w, w_up, w_down, b_up, b_down = args
    leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
    if strided:  # the same values: x every other column of a wider tensor, ids column-major
        wide = torch.zeros(x.shape[0], 2 * H).index_copy_(1, torch.arange(0, 2 * H, 2), x)
        leaves[0] = wide.requires_grad_()[:, ::2]
        ids = ids.t().contiguous().t()
    biases = [None if t is None else t.clone().requires_grad_() for t in (b_up, b_down)]
    y = mk.moe_experts(leaves[0], ids, *leaves[1:], *biases, **kw)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves + [b for b in biases if b is not None], gy)

    d = [t.double().requires_grad_() for t in (x, w, w_up, w_down)]
    db = [None if t is None else t.double().requires_grad_() for t in (b_up, b_down)]
    y_ref = reference.moe_experts(d[0], ids, *d[1:], *db, **kw)
    want = torch.autograd.grad(y_ref, d + [b for b in db if b is not None], gy.double())
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5


def test_experts_with_no_local_experts():
    """A shard that holds none of a group's experts (expert parallelism with more ranks than the
    group has experts) gets zeros, and zero gradients, through the kernels and the op."""
    x, ids, w, w_up, w_down, _, _ = make_experts(6, 16, 8, 3, 2, torch.float32, seed=2)
    x, w = x.requires_grad_(), w.requires_grad_()
    none_up, none_down = w_up[:0].requires_grad_(), w_down[:0].requires_grad_()
    assert torch.equal(mk.moe_experts_triton(x, ids, w, none_up, none_down), torch.zeros(6, 16))
    y = mk.moe_experts(x, ids, w, none_up, none_down)
    assert torch.equal(y, torch.zeros(6, 16))
    dx, dw = torch.autograd.grad(y.sum(), [x, w])
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dw, torch.zeros_like(w))


def test_layer_trains_end_to_end():
    """Router logits → routing op → experts op: gradients reach the router through the weights."""
    T, H, F, E, K = 8, 40, 24, 5, 2
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, H, generator=g)
    w_r = (torch.randn(E, H, generator=g) * 0.3).requires_grad_()
    _, _, _, w_up, w_down, _, _ = make_experts(T, H, F, E, K, torch.float32, seed=5)
    w_up.requires_grad_()
    ids, w = mk.moe_routing(x @ w_r.T, K, norm="sum")
    y = mk.moe_experts(x, ids, w, w_up, w_down)
    y.square().mean().backward()

    w_r2 = w_r.detach().double().requires_grad_()
    w_up2 = w_up.detach().double().requires_grad_()
    ids2, wts2 = reference.moe_routing(x.double() @ w_r2.T, K, norm="sum")
    y2 = reference.moe_experts(x.double(), ids2, wts2, w_up2, w_down.double())
    y2.square().mean().backward()
    assert rel_err(w_r.grad, w_r2.grad) < 1e-5
    assert rel_err(w_up.grad, w_up2.grad) < 1e-5


def test_ops_registered_with_fake():
    """The ops have fake implementations (what torch.compile and meta tensors need)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ns = getattr(torch.ops, mk.ops.NAMESPACE)
    with FakeTensorMode():
        x = torch.empty(4, 40)
        ids, w = ns.moe_routing(torch.empty(4, 5), 2, None, "softmax", "scores", 1, 1,
                                "top2_sum", "-inf", False, "none", 0.0, 0.0, 1.0, 1.0)  # fmt: skip
        args = (x, ids, w, torch.empty(5, 48, 40), torch.empty(5, 40, 24), None, None, 0, "silu",
                "standard", 0.0, 1.702, 1.0, 1.0, False)  # fmt: skip
        y, gu = ns.moe_experts(*args)
        _, gu_saved = ns.moe_experts(*args, save_gu=True)
    assert ids.shape == (4, 2) and ids.dtype == torch.int32 and y.shape == (4, 40)
    assert gu.shape == (0, 48) and gu_saved.shape == (8, 48)  # T*K rows of pre-activations


def test_reference_experts_backward_takes_each_weight_once():
    """The oracle (whose vjp is the Triton path's backward) unbinds each weight once instead of
    indexing w[e] per expert (whose backward writes a whole zero-filled weight per expert)."""
    x, ids, w, w_up, w_down = make_experts(7, 16, 8, 4, 2, torch.float32)[:5]
    w_up.requires_grad_()
    y = reference.moe_experts(x, ids, w, w_up, w_down.requires_grad_())
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    names = {type(n).__name__ for n in seen}
    assert "UnbindBackward0" in names and "SelectBackward0" not in names, names


@pytest.mark.parametrize(
    "glu_form, bias, weight_on_input, first, id_hi",
    [
        ("standard", False, False, 0, None),
        ("gpt_oss", True, False, 0, None),
        ("none", True, True, 0, None),  # plain MLP, weight on the input
        ("softcap_sigmoid", False, False, 2, 9),  # a group [2, 8) of 9 experts: slots skipped
        ("standard", True, False, 0, 3),  # experts 3 and 4 get no rows
    ],
)
@pytest.mark.parametrize(
    "interpreted, saved_gu, static_rows",
    [(True, True, False), (True, False, False), (False, False, False), (True, True, True),
     (False, False, True)],
)  # fmt: skip
def test_grouped_gemm_backward_matches_the_oracle(
    monkeypatch, glu_form, bias, weight_on_input, first, id_hi, interpreted, saved_gu, static_rows
):
    """The grouped-GEMM backward equals autograd through the oracle (float64 reference), with
    its elementwise pieces as Triton kernels (interpreter) and as their plain-torch twins, from
    the pre-activations the forward kernel saved (other groups' rows left NaN) or recomputed;
    with the exact rows or, as under CUDA-graph capture, all T*K of them (``static_rows``)."""
    if not interpreted:
        monkeypatch.setattr(backward_rows, "use_triton", lambda t: False)
    kw = dict(first_expert_id=first, activation="gelu", glu_form=glu_form, limit=1.5, alpha=1.7,
              gate_softcap=2.0, up_softcap=3.0, weight_on_input=weight_on_input)  # fmt: skip
    check_grouped_backward(11, 16, 8, 5, 3, bias, kw, saved_gu, 3, id_hi, static_rows)


@given(
    T=st.integers(1, 9), H=st.sampled_from([4, 8, 12]), F=st.sampled_from([4, 8]),
    E=st.integers(1, 5), K=st.integers(1, 3), first=st.integers(0, 2), extra=st.integers(0, 3),
    form=st.sampled_from(reference.GLU_FORMS), act=st.sampled_from(reference.ACTIVATIONS),
    bias=st.booleans(), weight_on_input=st.booleans(), saved_gu=st.booleans(),
    static_rows=st.booleans(), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_grouped_backward_property(
    T, H, F, E, K, first, extra, form, act, bias, weight_on_input, saved_gu, static_rows, seed
):
    """Over random small problems (a group [first, first+E) of first+E+extra global experts,
    dropped slots, every activation and form, biases, the weight on the input, pre-activations
    kept or not, exact or static rows), the grouped backward equals autograd through the float64
    oracle."""
    kw = dict(first_expert_id=first, activation=act, glu_form=form, limit=1.5, alpha=1.7,
              gate_softcap=2.0, up_softcap=3.0, weight_on_input=weight_on_input)  # fmt: skip
    id_hi = first + E + extra
    check_grouped_backward(T, H, F, E, K, bias, kw, saved_gu, seed, id_hi, static_rows)


def check_grouped_backward(T, H, F, E, K, bias, kw, saved_gu, seed, id_hi, static_rows=False):
    """``backward.experts_backward`` (from the pre-activations the forward kernel saved, other
    groups' rows left NaN, or recomputed; on the exact rows or on all T*K, ``static_rows``) equals
    autograd through the float64 oracle."""
    x, ids, w, w_up, w_down, b_up, b_down = make_experts(
        T, H, F, E, K, torch.float32, kw["glu_form"], bias, seed=seed, id_hi=id_hi
    )
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1))
    gu = None
    if saved_gu:
        gu = torch.full((T * K, w_up.shape[1]), float("nan"))
        mk.moe_experts_triton(x, ids, w, w_up, w_down, b_up, b_down, **kw, config=CFG, gu_out_NX=gu)
    got = backward.experts_backward(
        gy, x, ids, w, w_up, w_down, b_up, b_down, *kw.values(), gu_SX=gu, static_rows=static_rows
    )
    assert got is not None, "torch._grouped_mm refused float32 CPU tensors"
    leaves = [t.double().requires_grad_() if t is not None else None
              for t in (x, w, w_up, w_down, b_up, b_down)]  # fmt: skip
    y = reference.moe_experts(leaves[0], ids, *leaves[1:], **kw)
    inputs = [t for t in leaves if t is not None]
    if y.requires_grad:
        want = torch.autograd.grad(
            y, inputs, gy.double(), allow_unused=True, materialize_grads=True
        )
    else:  # no slot reaches the group: the oracle's output is a constant zero
        want = [torch.zeros_like(t) for t in inputs]
    names = ["dx", "dw", "dw_up", "dw_down"] + (["db_up", "db_down"] if bias else [])
    for name, a, b in zip(names, [g for g in got if g is not None], want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", reference.GLU_FORMS)
@pytest.mark.parametrize("act", reference.ACTIVATIONS)
def test_glu_rows_and_vjp_match_autograd(act, form):
    """The backward's GLU kernel and its hand-written vjp equal the oracle's GLU and autograd's vjp
    of it (float64), for every activation and form, with a bias per expert; the pre-activations
    straddle the clamp limit and the kinks."""
    N, F, E = 37, 12, 3
    X = F if form == "none" else 2 * F
    gen = torch.Generator().manual_seed(7)
    gu = torch.randn(N, X, generator=gen) * 2.5
    b = torch.randn(E, X, generator=gen) * 0.3
    e = torch.randint(0, E, (N,), generator=gen)
    d_h = torch.randn(N, F, generator=gen)
    b[0] = 0.0  # rows of expert 0 hit the kinks and the clamp bounds exactly
    kinks = torch.tensor([0.0, 1.5, -1.5, 0.0, 1.5, -1.5])
    gu[e == 0, :6] = kinks
    gu[e == 0, X - 6 :] = kinks
    glu_args = (b, e, act, form, 1.5, 1.7, 2.0, 3.0)

    def oracle(gu64):
        gu64 = gu64 + b.double()[e]
        g, u = (gu64, None) if form == "none" else gu64.chunk(2, dim=-1)
        return reference.glu(g, u, act, form, 1.5, 1.7, 2.0, 3.0)

    h_want, vjp = torch.func.vjp(oracle, gu.double())
    rw = torch.rand(N, generator=gen)
    h, hw = backward_rows.glu_rows(gu, *glu_args, rw_N=rw)
    torch.testing.assert_close(h.double(), h_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hw, h * rw[:, None])
    assert backward_rows.glu_rows(gu, *glu_args)[1] is None
    d_gu = backward_rows.glu_rows_vjp(gu, d_h, *glu_args)
    torch.testing.assert_close(d_gu.double(), vjp(d_h.double())[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("interpreted", [True, False])
def test_dot_and_scale(monkeypatch, interpreted):
    """Row dots (with an expert bias on a) and the scaled rows, kernel and plain-torch twin."""
    if not interpreted:
        monkeypatch.setattr(backward_rows, "use_triton", lambda t: False)
    gen = torch.Generator().manual_seed(3)
    N, H, E, R = 9, 1100, 4, 5  # H over one kernel block
    a, b_R = torch.randn(N, H, generator=gen), torch.randn(R, H, generator=gen)
    bias, e = torch.randn(E, H, generator=gen), torch.randint(0, E, (N,), generator=gen)
    idx, rw = torch.randint(0, R, (N,), generator=gen), torch.rand(N, generator=gen)
    dot, scaled = backward_rows.dot_and_scale(a, bias, e, b_R, idx, rw, scale_a=False)
    torch.testing.assert_close(dot, ((a + bias[e]) * b_R[idx]).sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scaled, b_R[idx] * rw[:, None])
    dot, scaled = backward_rows.dot_and_scale(a, None, e, b_R, idx, rw, scale_a=True)
    torch.testing.assert_close(dot, (a * b_R[idx]).sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(scaled, a * rw[:, None])


@pytest.mark.parametrize("interpreted", [True, False])
def test_zero_empty_experts_writes_only_the_empty_ones(monkeypatch, interpreted):
    """Experts with no rows get zero gradients even where the grouped GEMM left garbage (NaN
    here); the others are untouched. Kernel (interpreter) and plain-torch fallback alike."""
    if not interpreted:  # a CPU tensor without the interpreter
        monkeypatch.setattr(backward_rows, "use_triton", lambda t: False)
    d_w = torch.randn(5, 3, 4100)  # one expert's slice is longer than the kernel's block
    d_w[1] = float("nan")
    d_w[4] = float("nan")
    before = d_w.clone()
    counts = torch.tensor([3, 0, 1, 7, 0])
    assert backward_rows.zero_empty_experts(d_w, counts) is d_w
    assert torch.equal(d_w[[1, 4]], torch.zeros(2, 3, 4100))
    assert torch.equal(d_w[[0, 2, 3]], before[[0, 2, 3]])


@pytest.mark.parametrize("interpreted", [True, False])
def test_sum_slots_reads_each_token_rows_in_expert_order(monkeypatch, interpreted):
    """dx sums each token's rows in slot order, read in place from expert order (the kernel
    gathers them through each slot's row; the torch twin copies them into slot order first).
    Slots of other groups and dropped ones (-1) add nothing; a token with none gets zeros."""
    if not interpreted:
        monkeypatch.setattr(backward_rows, "use_triton", lambda t: False)
    T, K, E, first, H = 7, 3, 4, 2, 1030  # H longer than one block of the kernel
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 8, (T, K), generator=g)
    ids[5] = 0  # token 5: no slot in the group [2, 6)
    slot_N, _, _ = reference.sort_slots(ids, E, first)
    d_NH = torch.randn(len(slot_N), H, generator=g)
    want = torch.zeros(T * K, H, dtype=torch.float64)
    want[slot_N] = d_NH.double()
    want = want.view(T, K, H).sum(1)
    got = backward_rows.sum_slots(d_NH, slot_N, T, K)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[5], torch.zeros(H))


@pytest.mark.parametrize("static_rows", [False, True])
@pytest.mark.parametrize("T, E", [(6, 0), (0, 3)])
def test_grouped_backward_with_no_rows_gives_zeros(T, E, static_rows):
    """A shard holding none of a group's experts (E = 0) or a call without tokens gets zero
    gradients from the grouped backward itself, in both row modes (under CUDA-graph capture the
    static rows are used), and does not turn the grouped backward off for later calls."""
    x, ids, w, w_up, w_down, b_up, b_down = make_experts(
        max(T, 1), 16, 8, 3, 2, torch.float32, bias=True
    )
    x, ids, w = x[:T], ids[:T], w[:T]
    w_up, w_down, b_up, b_down = w_up[:E], w_down[:E], b_up[:E], b_down[:E]
    kw = dict(first_expert_id=0, activation="silu", glu_form="standard", limit=0.0, alpha=1.702,
              gate_softcap=1.0, up_softcap=1.0, weight_on_input=False)  # fmt: skip
    refused = set(backward._REFUSED)
    got = backward.experts_backward(
        torch.ones_like(x), x, ids, w, w_up, w_down, b_up, b_down, *kw.values(),
        static_rows=static_rows,
    )  # fmt: skip
    assert got is not None and backward._REFUSED == refused
    for grad, like in zip(got, (x, w, w_up, w_down, b_up, b_down), strict=True):
        assert torch.equal(grad, torch.zeros_like(like))


def test_grouped_gemm_backward_declines_unaligned_rows():
    """Rows the op cannot take (H * 4 bytes not a multiple of 16) fall back to the oracle: None."""
    x, ids, w, w_up, w_down, _, _ = make_experts(5, 10, 8, 3, 2, torch.float32)
    args = (0, "silu", "standard", 0.0, 1.702, 1.0, 1.0, False)
    gy = torch.ones(5, 10)
    assert backward.experts_backward(gy, x, ids, w, w_up, w_down, None, None, *args) is None


def test_tuner_moves_both_block_m_together():
    """The tuner's first pass halves / doubles block_m of both GEMMs at once: the padding follows
    the larger block_m, so per-GEMM moves alone never try less padding."""
    from moe_kernels.tune import joint_candidates

    base = MoeConfig(GemmConfig(128, 128, 64, 8, 8, 3), GemmConfig(128, 256, 64, 8, 8, 4))
    got = joint_candidates(base)
    assert [(c.up.block_m, c.down.block_m) for c in got] == [(64, 64), (256, 256)]
    assert all(c.up.block_n == 128 and c.down.block_n == 256 for c in got)
    small = MoeConfig(GemmConfig(16, 32, 256, 1, 4, 4), GemmConfig(16, 64, 256, 1, 4, 3))
    assert [c.block_m for c in joint_candidates(small)] == [32]


def quantize_int8(w):
    """Symmetric int8 with one float32 scale per row (as the generated quant.py)."""
    scale = (w.abs().amax(-1) / 127.0).clamp(min=1e-12)
    return (w / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w):
    """Symmetric int4 in [-8, 7], packed two per byte along the rows (low nibble = even column)."""
    scale = (w.abs().amax(-1) / 7.0).clamp(min=1e-12)
    q = (w / scale.unsqueeze(-1)).round().clamp(-8, 7).to(torch.int8)
    nibbles = (q + 8).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale


def quantize_fp8(w):
    """fp8 e4m3 with the row's max mapped to 448 (as the generated quant.py)."""
    scale = (w.abs().amax(-1) / 448.0).clamp(min=1e-12)
    return (w / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kw", [{}, dict(glu_form="gpt_oss", limit=7.0), dict(first_expert_id=2)])
def test_experts_quantized_weights(bits, dtype, kw):
    """Weight-only int8 / int4 / fp8: the kernels load the stored tiles (int4: unpacked in
    registers) and scale the accumulators per weight row; equal to the float computation with the dequantised
    weights. H = 40 is not a multiple of BLOCK_K: the masked K loop is covered too."""
    T, H, F, E, K = 9, 40, 24, 5, 3
    x, ids, w, w_up, w_down, _, _ = make_experts(T, H, F, E, K, torch.float32, seed=7, id_hi=8)
    (q_up, s_up), (q_down, s_down) = QUANTIZE[bits](w_up), QUANTIZE[bits](w_down)
    deq_up = reference.dequantize(q_up, s_up, torch.float32)
    deq_down = reference.dequantize(q_down, s_down, torch.float32)
    if bits == "int4":  # the packing round-trips: dequantised values on the int4 grid
        grid = deq_up / s_up[..., None]
        torch.testing.assert_close(grid, grid.round())
        assert grid.min() >= -8.001 and grid.max() <= 7.001
    y = mk.moe_experts_triton(
        x.to(dtype), ids, w, q_up, q_down, **kw, w_up_scale_EX=s_up, w_down_scale_EH=s_down,
        config=CFG,
    )  # fmt: skip
    want = ref64(x, ids, w, deq_up, deq_down, None, None, **kw)
    assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 3e-3)
    assert y.dtype == dtype


@pytest.mark.parametrize("bits", ["int8", "int4", "fp8"])
def test_experts_op_quantized_backward(bits):
    """Through the op with autograd: gradients reach x and the routing weights, not the frozen
    integer weights, and equal those of the float layer with the dequantised weights."""
    x, ids, w, w_up, w_down, _, _ = make_experts(7, 40, 24, 5, 3, torch.float32, seed=11)
    (q_up, s_up), (q_down, s_down) = QUANTIZE[bits](w_up), QUANTIZE[bits](w_down)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = mk.moe_experts(xl, ids, wl, q_up, q_down, w_up_scale_EX=s_up, w_down_scale_EH=s_down)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [xl, wl], gy)
    d = [t.double().requires_grad_() for t in (x, w)]
    deq = [reference.dequantize(q, s, torch.float64) for q, s in ((q_up, s_up), (q_down, s_down))]
    y_ref = reference.moe_experts(d[0], ids, d[1], *deq)
    want = torch.autograd.grad(y_ref, d, gy.double())
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5
