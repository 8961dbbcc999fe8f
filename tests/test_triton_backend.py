"""The generated layer's Triton backend against its torch backend, on CPU under TRITON_INTERPRET=1.

Every spec here is built once; each test runs the same layer with ``backend="triton"`` and
``backend="torch"`` (same weights) and compares outputs and gradients in float32.
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # see tests/conftest.py

import pytest  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from tests.genutil import build_package  # noqa: E402

SPECS = {
    "mixtral_like": """
name: mixtral_like
hidden: 40
dtype: fp32
experts: [{count: 5, ffn: 24}]
router: {top_k: 2, normalize: sum}
""",
    "deepseek_like": """
name: deepseek_like
hidden: 32
dtype: fp32
experts: [{count: 8, ffn: 16}]
shared: {ffn: 32}
router:
  score: sigmoid
  top_k: 3
  selection_bias: scores
  groups: {count: 4, keep: 2}
  normalize: {kind: sum, eps: 1.0e-20}
  scale: 2.5
""",
    "gpt_oss_like": """
name: gpt_oss_like
hidden: 24
dtype: fp32
experts: [{count: 4, ffn: 8, glu: gpt_oss, limit: 7.0, alpha: 1.702, bias: true}]
router: {top_k: 2, topk_on: logits, linear_bias: true}
""",
    "two_widths_k1": """
name: two_widths_k1
hidden: 16
dtype: fp32
experts:
  - {name: wide, count: 3, ffn: 24, activation: gelu}
  - {name: narrow, count: 4, ffn: 8, kind: mlp, activation: relu2}
router: {top_k: 1}
capacity: {factor: 1.0}
""",
    "llama4_like": """
name: llama4_like
hidden: 16
dtype: fp32
experts: [{count: 4, ffn: 12}]
weight_on: input
router: {top_k: 1, topk_on: logits, score: sigmoid}
""",
    "many_experts": """
name: many_experts
hidden: 16
dtype: fp32
experts: [{count: 16, ffn: 8, bias: true}]
router: {top_k: 4, normalize: sum}
""",  # 16 experts with biases
    "quantized_mix": """
name: quantized_mix
hidden: 32
dtype: fp32
experts:
  - {name: wide, count: 4, ffn: 16}
  - {name: narrow_int8, count: 4, ffn: 8, dtype: int8}
  - {name: tiny_int4, count: 2, ffn: 8, dtype: int4}
  - {name: tiny_fp8, count: 2, ffn: 8, dtype: fp8}
router: {top_k: 3, normalize: sum}
""",  # int8, int4 and fp8 through the kernels (stored tiles, row scales)
    "expert_choice_zero_latent": """
name: expert_choice_zero_latent
hidden: 16
dtype: fp32
experts: [{count: 6, ffn: 8}]
latent: {dim: 8}
router: {top_k: 2, kind: expert_choice}
capacity: {factor: 1.0}
""",  # experts choose their tokens; experts work in a latent projection
    "sparsemixer": """
name: sparsemixer
hidden: 16
dtype: fp32
experts: [{count: 6, ffn: 8}]
router: {top_k: 2, kind: sparsemixer, sparsemixer_eps: 0.01}
""",
    "zero_experts_sequence_capacity": """
name: zero_experts_sequence_capacity
hidden: 16
dtype: fp32
experts: [{count: 6, ffn: 8}]
zero_experts: 2
router: {top_k: 2}
capacity: {factor: 0.5, scope: sequence, drop: probs}
""",  # identity experts; slots dropped by probability within each sequence
    "v2_masked": """
name: v2_masked
hidden: 16
dtype: fp32
experts: [{count: 8, ffn: 8, glu: clamp_then_act, limit: 1.5}]
router: {top_k: 3, groups: {count: 4, keep: 2, score: max, masked: "0", weights_from: masked}, scale: 1.5}
""",
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def layer(request):
    pkg = build_package(SPECS[request.param])
    torch.manual_seed(0)
    layer = pkg.MoELayer()
    with torch.no_grad():
        for name, buf in layer.named_buffers():
            if name.endswith("selection_bias"):
                buf.normal_(0, 0.1)
        for name, p in layer.named_parameters():
            if name.endswith("bias") or ".b_" in name:
                p.normal_(0, 0.1)
    return layer


@pytest.mark.parametrize("tokens", [1, 7])
def test_forward_and_backward_match_torch(layer, tokens):
    x = torch.randn(tokens, layer.router.weight.shape[1])
    results = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        layer.zero_grad()
        xb = x.clone().requires_grad_()
        y = layer(xb)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        results[backend] = (y.detach(), xb.grad, grads)
    y_t, gx_t, g_t = results["triton"]
    y_r, gx_r, g_r = results["torch"]
    torch.testing.assert_close(y_t, y_r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_t, gx_r, atol=1e-4, rtol=1e-4)
    for name, p in layer.named_parameters():  # a group no token reached may have no grad at all
        zeros = torch.zeros_like(p)
        got, want = g_t.get(name, zeros), g_r.get(name, zeros)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)


def test_routing_kernel_matches_torch_router(layer):
    x = torch.randn(9, layer.router.weight.shape[1])
    ids_t, w_t, _ = layer.router(x, 1, triton=True)
    ids_r, w_r, _ = layer.router(x, 1, triton=False)

    def dense(ids, w):  # routing as a [T, E] matrix: order of the k slots does not matter
        return torch.zeros(9, 64).scatter_add_(1, ids.clamp(min=0), w * (ids >= 0))

    torch.testing.assert_close(dense(ids_t, w_t), dense(ids_r, w_r), atol=1e-5, rtol=1e-5)


def test_all_tokens_on_one_expert_and_empty_experts(layer):
    x = torch.randn(6, layer.router.weight.shape[1])
    ids = torch.zeros(6, 1, dtype=torch.long)
    w = torch.rand(6, 1)
    out = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        out[backend] = layer.experts(x, ids, w)
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4, rtol=1e-4)


def test_an_empty_batch(layer):
    """T = 0 (an empty micro-batch, an expert-parallel rank with no tokens) on both backends: an
    empty output, and every balancing loss present and 0."""
    x = torch.randn(4, layer.router.weight.shape[1])
    layer(x)
    names = set(getattr(layer, "aux_losses", {}))
    for backend in ("triton", "torch"):
        layer.backend = backend
        empty = x[:0].clone().requires_grad_()
        y = layer(empty)
        assert y.shape == empty.shape
        losses = getattr(layer, "aux_losses", {})
        assert set(losses) == names
        assert all(float(v) == 0.0 for v in losses.values()), losses
        if y.requires_grad:
            y.sum().backward()


def test_training_with_the_bias_update_matches_torch():
    """Aux-loss-free balancing moves the selection bias in place during a training forward; the
    routing kernel's backward must not read the moved bias (it kept a copy)."""
    pkg = build_package(
        SPECS["deepseek_like"]
        + "balance: {aux_loss: 0.01, seq_aux_loss: 0.001, bias_update_rate: 0.01}\n"
    )
    torch.manual_seed(3)
    layers = {"triton": pkg.MoELayer(backend="triton"), "torch": pkg.MoELayer(backend="torch")}
    layers["torch"].load_state_dict(layers["triton"].state_dict())
    x = torch.randn(2, 7, 32)
    out = {}
    for backend, layer in layers.items():
        layer.train()
        y = layer(x)
        (y.square().sum() + layer.aux_losses["total"]).backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        out[backend] = (y.detach(), layer.router.selection_bias.clone(), grads)
    (y_t, b_t, g_t), (y_r, b_r, g_r) = out["triton"], out["torch"]
    torch.testing.assert_close(y_t, y_r, atol=1e-4, rtol=1e-4)
    assert bool((b_t != 0).any()), "the training forward moved the bias"
    torch.testing.assert_close(b_t, b_r)
    assert set(g_t) == set(g_r)
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["deepseek_like", "two_widths_k1"])
def test_torch_compile_fullgraph(name):
    """The generated layer traces in one graph (custom ops, no breaks), first call included, and
    the compiled forward and backward equal eager. aot_eager: tracing is what is checked here;
    inductor's code generation runs in the GPU tests."""
    pkg = build_package(SPECS[name])  # fresh: the kernels module is first imported while tracing
    torch.manual_seed(0)
    layer = pkg.MoELayer(backend="triton")
    x = torch.randn(7, layer.router.weight.shape[1])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc = compiled(xc)
    yc.sum().backward()
    grads_c = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    ye = layer(xe)
    ye.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(xc.grad, xe.grad)
    for n, p in layer.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads_c[n], p.grad, msg=n)


def test_torch_compile_fullgraph_computes_the_losses_in_the_forward():
    """A compiled forward computes its balancing losses (nothing is left for a read outside the
    graph), an inference one included, with the values an eager forward's read gives; the trace
    has no graph break."""
    spec = (
        SPECS["deepseek_like"] + "balance: {aux_loss: 0.01, seq_aux_loss: 0.001, z_loss: 0.001}\n"
    )
    pkg = build_package(spec)
    torch.manual_seed(0)
    layer = pkg.MoELayer(backend="triton").eval()
    x = torch.randn(2, 5, layer.router.weight.shape[1])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(x)
        assert isinstance(layer._losses, dict)
        got = dict(layer.aux_losses)
        layer(x)
        assert isinstance(layer._losses, tuple)
    assert set(got) == {"load_balance", "seq_load_balance", "z", "total"}
    for name, value in layer.aux_losses.items():
        torch.testing.assert_close(got[name], value, msg=name)


def _grads(layer, x, forward=None) -> list:
    """[x's gradient, each parameter's] of a fixed loss of ``forward(x)`` (default: the layer)."""
    layer.zero_grad()
    xb = x.clone().requires_grad_()
    y = (forward or layer)(xb)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [xb.grad] + [p.grad for _, p in layer.named_parameters()]


def _assert_same_grads(got: list, want: list) -> None:
    for a, b in zip(got, want, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_activation_checkpointing_matches_plain_backward(layer):
    """Under ``torch.utils.checkpoint`` (the memory knob for training: the experts op keeps its
    pre-activations only while the layer's forward is re-run for the backward) the Triton layer's
    gradients equal those of a plain backward."""
    layer.backend = "triton"
    x = torch.randn(7, layer.router.weight.shape[1])
    plain = _grads(layer, x)
    ckpt = _grads(
        layer, x, lambda xb: torch.utils.checkpoint.checkpoint(layer, xb, use_reentrant=False)
    )
    _assert_same_grads(ckpt, plain)


def test_keep_preactivations_off_saves_less_and_gives_the_same_gradients(layer):
    """``keep_preactivations=False`` (the layer's memory knob) keeps no [T*K, 2F] pre-activations
    for the backward, which recomputes them: same gradients, less saved."""
    layer.backend = "triton"
    x = torch.randn(7, layer.router.weight.shape[1])
    grads, saved = [], []
    for keep in (True, False):
        for group in layer.groups.values():
            group.keep_preactivations = keep
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grads.append(_grads(layer, x))
        saved.append(sum(sizes))
    for group in layer.groups.values():
        group.keep_preactivations = True
    _assert_same_grads(grads[1], grads[0])
    assert saved[1] < saved[0]
    built = type(layer)(torch.float32, keep_preactivations=False)  # the constructor's switch
    assert not any(g.keep_preactivations for g in built.groups.values())


def test_one_group_layers_run_the_backward_on_static_rows(layer, monkeypatch):
    """A layer of one expert group holding every expert runs its backward on all T*K slots
    (nearly all of them its own: no host sync to count them); a layer of several groups counts
    each group's own, and so does expert choice (ids [T, E], mostly -1). The gradients against
    the torch backend are checked above."""
    ops = type(layer).__module__.rsplit(".", 1)[0]
    bw = __import__(ops, fromlist=["backend"]).backend.kernels().backward
    real, seen = bw._sorted_slots, []
    monkeypatch.setattr(bw, "_sorted_slots", lambda *a: seen.append(a[3]) or real(*a))
    layer.backend = "triton"
    x = torch.randn(7, layer.router.weight.shape[1], requires_grad=True)
    layer(x).sum().backward()
    router = sys.modules[type(layer.router).__module__]
    one = len(layer.groups) == 1 and not hasattr(router, "select_expert_choice")
    assert [g.static_rows for g in layer.groups.values()] == [one] * len(layer.groups)
    assert seen and all(static == one for static in seen), seen


def test_no_grad_calls_skip_the_custom_ops(layer, monkeypatch):
    """Without autograd or tracing, the public functions call the kernels directly (the custom
    op's dispatch is host overhead at small T); with autograd they go through the op."""
    ops = type(layer).__module__.rsplit(".", 1)[0]
    k = __import__(ops, fromlist=["backend"]).backend.kernels().ops
    calls = []
    real = k._experts_op
    monkeypatch.setattr(k, "_experts_op", lambda *a: calls.append(1) or real(*a))
    layer.backend = "triton"
    x = torch.randn(5, layer.router.weight.shape[1])
    with torch.no_grad():
        y_fast = layer(x)
    assert not calls
    y_op = layer(x)
    assert calls
    torch.testing.assert_close(y_fast, y_op.detach())


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(f for f, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_torch_path_backward_reads_each_weight_once(layer):
    """The per-expert loop takes each expert's slice of a weight through one unbind, not w[e]:
    the backward of w[e] writes a zero-filled copy of the whole weight per expert (E x its size;
    on an H200, 170 ms instead of ~10 ms for a Qwen3-30B-A3B layer at T=4096)."""
    layer.backend = "torch"
    y = layer(torch.randn(9, layer.router.weight.shape[1]))
    nodes = _graph_nodes(y)
    assert "UnbindBackward0" in nodes and "SelectBackward0" not in nodes, nodes


def test_quantized_groups_run_the_kernels_with_scales(monkeypatch):
    """The int8, int4 and fp8 groups of a mixed-precision layer reach the kernels as stored tiles +
    row scales (not dequantised in torch), and the layer matches the torch backend."""
    pkg = build_package(SPECS["quantized_mix"])
    torch.manual_seed(0)
    layer = pkg.MoELayer(backend="triton")
    k = pkg.backend.kernels().ops
    seen = []
    real = k.moe_experts_triton

    def spy(x, ids, w, w_up, w_down, *args, **kw):
        scale = kw.get(
            "w_up_scale_EX", args[10] if len(args) > 10 else None
        )  # after weight_on_input
        seen.append((w_up.dtype, scale is not None))
        return real(x, ids, w, w_up, w_down, *args, **kw)

    monkeypatch.setattr(k, "moe_experts_triton", spy)
    x = torch.randn(11, 32)
    with torch.no_grad():
        y = layer(x)
        layer.backend = "torch"
        want = layer(x)
    stored = {(torch.int8, True), (torch.uint8, True), (torch.float8_e4m3fn, True)}
    assert set(seen) == stored | {(torch.float32, False)}, seen
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_expert_choice_gives_the_kernels_compact_slots(monkeypatch):
    """Expert choice routes with [T, E] slots, mostly -1; in training the kernels get each token's
    chosen slots only, [T, K'] with K' the most experts any token has, so their per-slot buffers
    and the pre-activations kept for the backward are T·K' rows rather than T·E; without grad the
    slots go as they are (no host sync), as in a frozen layer whose input needs no gradient, unless
    the slots' outputs would take ``COMPACT_MIN_BYTES``. The output and gradients equal the torch
    backend's (checked on this spec above, through the compacted slots)."""
    pkg = build_package(SPECS["expert_choice_zero_latent"])
    torch.manual_seed(0)
    layer = pkg.MoELayer(backend="triton")
    k = pkg.backend.kernels()
    widths, inputs, real = [], [], k.moe_experts

    def spy(x, ids, *args, **kwargs):
        widths.append(ids.shape[1])
        inputs.append(x.shape)
        return real(x, ids, *args, **kwargs)

    monkeypatch.setattr(k, "moe_experts", spy)
    x = torch.randn(24, layer.router.weight.shape[1])
    ids_TE, _, _ = layer.route(x)
    layer(x)
    with torch.no_grad():
        layer(x)
    layer.requires_grad_(False)  # frozen, grad enabled: nothing is recorded, no host sync
    layer(x)
    layer(x.requires_grad_())  # but the input's gradient needs the backward
    T, H = inputs[0]  # the experts' input (a latent space here)
    monkeypatch.setattr(pkg.experts, "COMPACT_MIN_BYTES", T * 6 * H * 4)  # [T*E, H] float32
    with torch.no_grad():  # large slot outputs: compacted without grad too
        layer(x)
        layer(x[:-1])  # one token fewer: below the size
    chosen = int((ids_TE >= 0).sum(dim=1).max())
    assert ids_TE.shape[1] == 6 and chosen < 6
    assert widths == [chosen, 6, 6, chosen, chosen, 6]


@functools.cache
def _dispatch_module():
    return build_package(SPECS["expert_choice_zero_latent"]).dispatch


@given(st.integers(1, 9), st.integers(1, 7), st.integers(0, 4), st.integers(1, 5), st.randoms())
def test_compact_slots_keeps_each_tokens_group_slots_in_order(T, K, first, count, rnd):
    """``compact_slots``: every row keeps exactly its slots of experts [first, first + count), in
    column order with their weights, then -1 / 0; K' is the most any row keeps (at least 1), and
    the slots are returned as they are when that is all K, or when nothing is recorded. The
    weights' gradient goes back to the slots it came from."""
    ids = torch.tensor([[rnd.randint(-1, 9) for _ in range(K)] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    same_ids, same_w = _dispatch_module().compact_slots(ids, w, first, count, False)
    assert same_ids is ids and same_w is w  # nothing recorded: as they are
    got_ids, got_w = _dispatch_module().compact_slots(ids, w, first, count, True)
    keep = (ids >= first) & (ids < first + count)
    kept = max(1, int(keep.sum(1).max()))
    if kept == K:
        assert got_ids is ids and got_w is w
        return
    assert got_ids.shape == (T, kept)
    for t in range(T):
        n = int(keep[t].sum())
        assert got_ids[t, :n].tolist() == ids[t][keep[t]].tolist()
        assert got_w[t, :n].tolist() == w[t][keep[t]].tolist()
        assert (got_ids[t, n:] == -1).all() and (got_w[t, n:] == 0).all()
    got_w.sum().backward()
    assert torch.equal(w.grad, keep.float())
