"""The generated torch layer against naive per-token oracles, for features HF has no block for:
several expert groups of different widths and precisions, capacity and dropping, expert choice,
latent experts, weight on the input, losses, aux-loss-free bias updates, safetensors and autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.genutil import build_package

BASE = """
name: t
hidden: 24
dtype: fp32
experts:
  - {name: a, count: 4, ffn: 16}
  - {name: b, count: 3, ffn: 8, activation: gelu}
"""

ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def dense_weights(group):
    """A group's weights as dense float tensors (dequantised if needed)."""
    gu = torch.stack([group.weight("w_gate_up_E2FH", e) for e in range(group.COUNT)]).float()
    down = torch.stack([group.weight("w_down_EHF", e) for e in range(group.COUNT)]).float()
    return gu, down


def oracle_experts(layer, x_TH, ids_TK, w_TK, acts, weight_on_input=False):
    """y_t = Σ_k w_tk · E_{id_tk}(x_t), one token and one slot at a time."""
    experts = []
    for group, act in zip(layer.groups.values(), acts, strict=True):
        gu, down = dense_weights(group)
        for e in range(group.COUNT):
            experts.append((gu[e], down[e], ACT[act]))
    y = torch.zeros_like(x_TH, dtype=torch.float32)
    for t in range(x_TH.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            gu, down, act = experts[e]
            xin = x_TH[t].float() * (w_TK[t, k] if weight_on_input else 1.0)
            gate, up = (gu @ xin).chunk(2)
            out = down @ (act(gate) * up)
            y[t] += out if weight_on_input else w_TK[t, k] * out
    return y


def test_groups_of_different_widths_match_the_oracle():
    pkg = build_package(BASE + "router: {top_k: 3, normalize: sum}\n")
    torch.manual_seed(0)
    layer = pkg.MoELayer()
    x = torch.randn(13, 24)
    ids, w, logits = layer.route(x)
    assert ids.shape == (13, 3) and logits.shape == (13, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(13))
    y = layer.experts(x, ids, w)
    torch.testing.assert_close(
        y, oracle_experts(layer, x, ids, w, ["silu", "gelu"]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(layer(x), y)


@pytest.mark.parametrize("dtype,tol", [("int8", 0.02), ("int4", 0.2), ("fp8", 0.1)])
def test_quantised_group_matches_its_dequantised_weights(dtype, tol):
    spec = BASE.replace("activation: gelu}", f"activation: gelu, dtype: {dtype}}}")
    pkg = build_package(spec + "router: {top_k: 2}\n")
    torch.manual_seed(1)
    layer = pkg.MoELayer()
    x = torch.randn(9, 24)
    ids, w, _ = layer.route(x)
    y = layer.experts(x, ids, w)
    torch.testing.assert_close(
        y, oracle_experts(layer, x, ids, w, ["silu", "gelu"]), atol=1e-5, rtol=1e-5
    )
    # and the quantisation itself is close to the dense weights it came from
    group = layer.groups["b"]
    dense = torch.randn(3, 16, 24)
    group.load_dense(dense, torch.randn(3, 24, 8))
    err = (group.weight("w_gate_up_E2FH", 0).float() - dense[0]).abs().max() / dense[0].abs().max()
    assert err < tol


def test_capacity_drops_by_position_per_sequence():
    pkg = build_package(BASE + "router: {top_k: 2}\ncapacity: {tokens: 2, scope: sequence}\n")
    torch.manual_seed(2)
    layer = pkg.MoELayer()
    x = torch.randn(2, 10, 24)
    ids, w, _ = layer.route(x.reshape(-1, 24), num_seqs=2)
    free = pkg.router.select_topk(layer.router.logits(x.reshape(-1, 24)))[0]
    for s in range(2):
        seq_ids, seq_free = ids[s * 10 : (s + 1) * 10], free[s * 10 : (s + 1) * 10]
        for e in range(7):
            assert int((seq_ids == e).sum()) == min(2, int((seq_free == e).sum()))
        # first choices are served before second choices, earlier tokens first
        for e in range(7):
            order = [(k, t) for k in range(2) for t in range(10) if seq_free[t, k] == e]
            kept = [(k, t) for k, t in order if seq_ids[t, k] == e]
            assert kept == order[: len(kept)]
    assert bool((w[ids < 0] == 0).all())


def test_capacity_drops_lowest_weights_with_probs_policy():
    pkg = build_package(BASE + "router: {top_k: 1}\ncapacity: {factor: 1.0, drop: probs}\n")
    torch.manual_seed(3)
    layer = pkg.MoELayer()
    x = torch.randn(21, 24)
    ids, w, _ = layer.route(x)
    free_ids, free_w = pkg.router.select_topk(layer.router.logits(x))
    cap = math.ceil(1.0 * 21 * 1 / 7)
    for e in range(7):
        mine = free_w[free_ids == e]
        kept = w[ids == e]
        assert len(kept) == min(cap, len(mine))
        torch.testing.assert_close(
            kept.sort().values, mine.sort(descending=True).values[: len(kept)].sort().values
        )


def test_expert_choice_each_expert_takes_its_top_tokens():
    pkg = build_package(BASE + "router: {kind: expert_choice, top_k: 2}\ncapacity: {factor: 1.0}\n")
    torch.manual_seed(4)
    layer = pkg.MoELayer()
    x = torch.randn(14, 24)
    ids, w, logits = layer.route(x)
    assert ids.shape == (14, 7)
    cap = math.ceil(14 * 2 / 7)
    probs = logits.softmax(-1)
    for e in range(7):
        chosen = (ids[:, e] == e).nonzero().flatten()
        assert len(chosen) == cap
        assert set(chosen.tolist()) == set(probs[:, e].topk(cap).indices.tolist())
    y = layer.experts(x, ids, w)
    torch.testing.assert_close(
        y, oracle_experts(layer, x, ids, w, ["silu", "gelu"]), atol=1e-5, rtol=1e-5
    )


def test_weight_on_input_latent_zero_experts_and_output_bias():
    spec = BASE + (
        "zero_experts: 2\nweight_on: input\nlatent: {dim: 12}\noutput_bias: true\nrouted_scale: 0.5\n"
        "router: {top_k: 3, score: sigmoid, topk_on: logits}\n"
    )
    pkg = build_package(spec.replace("hidden: 24", "hidden: 20"))
    torch.manual_seed(5)
    layer = pkg.MoELayer()
    with torch.no_grad():
        layer.output_bias.normal_()
    x = torch.randn(11, 20)
    ids, w, logits = layer.route(x)
    assert logits.shape == (11, 9)
    x_in = layer.latent_in(x)
    routed = oracle_experts(layer, x_in, ids.masked_fill(ids >= 7, -1), w, ["silu", "gelu"], True)
    routed += (w * (ids >= 7)).sum(-1, keepdim=True) * x_in
    expected = 0.5 * layer.latent_out(routed) + layer.output_bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_losses_and_bias_update():
    spec = BASE + (
        "router: {top_k: 2, score: sigmoid, selection_bias: scores}\n"
        "balance: {aux_loss: 0.1, seq_aux_loss: 0.01, z_loss: 0.001, bias_update_rate: 0.01}\n"
    )
    pkg = build_package(spec)
    torch.manual_seed(6)
    layer = pkg.MoELayer()
    x = torch.randn(3, 8, 24)
    layer.eval()
    layer(x)
    losses = layer.aux_losses
    assert set(losses) == {"load_balance", "seq_load_balance", "z", "total"}
    logits = layer.router.logits(x.reshape(-1, 24))
    torch.testing.assert_close(losses["z"], torch.logsumexp(logits, -1).square().mean())
    total = 0.1 * losses["load_balance"] + 0.01 * losses["seq_load_balance"] + 0.001 * losses["z"]
    torch.testing.assert_close(losses["total"], total)
    assert bool((layer.router.selection_bias == 0).all()), "eval must not move the bias"
    layer.train()
    ids, _, _ = layer.route(x.reshape(-1, 24))
    load = torch.bincount(ids.flatten(), minlength=7).float()
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.selection_bias, expected)


LOSSES_SPEC = BASE + (
    "router: {top_k: 2, score: sigmoid, selection_bias: scores}\n"
    "balance: {aux_loss: 0.1, seq_aux_loss: 0.01, z_loss: 0.001}\n"
)


class CountingLosses:
    """Wraps ``router.losses``, counting its calls."""

    def __init__(self, losses):
        self.losses, self.calls = losses, 0

    def __call__(self, *args):
        self.calls += 1
        return self.losses(*args)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "frozen"])
def test_inference_forward_computes_its_losses_when_read(mode):
    """A forward that needs no gradient leaves the losses for the first read of ``aux_losses``;
    the values are those the forward would have computed, and a second read computes nothing."""
    pkg = build_package(LOSSES_SPEC)
    torch.manual_seed(11)
    layer = pkg.MoELayer().eval()
    x = torch.randn(2, 5, 24)
    layer(x)  # a forward that needs a gradient computes them in the forward
    want = {name: value.detach() for name, value in layer.aux_losses.items()}
    layer.router.losses = counting = CountingLosses(layer.router.losses)
    if mode == "frozen":
        layer.requires_grad_(False)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode)
    with context() if context else torch.enable_grad():
        y = layer(x)
    assert not y.requires_grad
    assert counting.calls == 0, "the forward computed the losses"
    got = layer.aux_losses
    assert counting.calls == 1
    assert set(got) == {"load_balance", "seq_load_balance", "z", "total"}
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
        assert not got[name].requires_grad
    assert layer.aux_losses is got and counting.calls == 1
    with torch.no_grad():  # the next forward's losses replace them, unread ones included
        layer(x[:1])
        layer(x)
    assert counting.calls == 1
    torch.testing.assert_close(layer.aux_losses["total"], want["total"], rtol=0, atol=0)
    assert counting.calls == 2


def test_losses_of_forwards_that_train_or_are_large_are_computed_in_the_forward():
    """Where the losses can be trained through, their inputs are large, or ``lazy_losses`` is off,
    the forward computes them (nothing of the forward is kept for a later read)."""
    pkg = build_package(LOSSES_SPEC)
    torch.manual_seed(12)
    layer = pkg.MoELayer()
    layer.router.losses = counting = CountingLosses(layer.router.losses)
    x = torch.randn(6, 24)
    layer(x)
    assert counting.calls == 1 and isinstance(layer._losses, dict)
    assert layer.aux_losses["total"].requires_grad
    layer.aux_losses["total"].backward()
    assert layer.router.weight.grad is not None
    with torch.no_grad():
        layer(torch.randn(pkg.layer.LAZY_LOSS_TOKENS + 1, 24))
    assert counting.calls == 2 and isinstance(layer._losses, dict)
    with torch.no_grad():
        layer(torch.randn(pkg.layer.LAZY_LOSS_TOKENS, 24))
    assert counting.calls == 2
    layer.lazy_losses = False  # asked for: every forward computes them
    with torch.no_grad():
        layer(x)
    assert counting.calls == 3 and isinstance(layer._losses, dict)


def test_backward_reaches_every_parameter():
    pkg = build_package(BASE + "router: {top_k: 7}\nshared: {ffn: 8, gate: sigmoid_linear}\n")
    torch.manual_seed(7)
    layer = pkg.MoELayer()
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad is not None


def test_safetensors_round_trip(tmp_path):
    spec = BASE.replace("activation: gelu}", "activation: gelu, dtype: int4}")
    pkg = build_package(spec + "router: {top_k: 2, linear_bias: true}\n")
    torch.manual_seed(8)
    a, b = pkg.MoELayer(), pkg.MoELayer()
    a.save_safetensors(tmp_path / "w.safetensors")
    b.load_safetensors(tmp_path / "w.safetensors")
    x = torch.randn(6, 24)
    torch.testing.assert_close(a(x), b(x))
    safetensors = pytest.importorskip("safetensors.torch")
    loaded = safetensors.load_file(str(tmp_path / "w.safetensors"))
    assert set(loaded) == set(a.state_dict())


def test_meta_device_and_bf16():
    pkg = build_package(BASE.replace("dtype: fp32", "dtype: bf16") + "router: {top_k: 2}\n")
    assert pkg.MoELayer(device="meta").router.weight.is_meta
    layer = pkg.MoELayer()
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = layer.float()(x.float())
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


def test_no_tokens_and_all_on_one_expert():
    pkg = build_package(BASE + "router: {top_k: 2}\n")
    layer = pkg.MoELayer()
    assert layer(torch.randn(0, 24)).shape == (0, 24)
    x = torch.randn(5, 24)
    ids = torch.zeros(5, 2, dtype=torch.long)
    ids[:, 1] = -1
    w = torch.rand(5, 2)
    torch.testing.assert_close(
        layer.experts(x, ids, w),
        oracle_experts(layer, x, ids, w, ["silu", "gelu"]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_a_float_group_keeps_its_weights_in_its_own_dtype():
    """A group whose float dtype differs from the layer's stores its weights so (the plan counts
    them so) and computes in the layer's dtype: the same as an fp32 layer given the bf16-rounded
    weights, on both backends, with gradients in the stored dtype."""
    stored = build_package(
        BASE.replace("ffn: 16}", "ffn: 16, dtype: bf16}") + "router: {top_k: 2}\n"
    )
    plain = build_package(BASE + "router: {top_k: 2}\n")
    torch.manual_seed(9)
    layer = stored.MoELayer()
    a, b = layer.groups["a"], layer.groups["b"]
    assert a.w_gate_up_E2FH.dtype == a.w_down_EHF.dtype == torch.bfloat16
    assert b.w_gate_up_E2FH.dtype == torch.float32
    ref = plain.MoELayer()
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(9, 24)
    want = ref(x)
    for backend in ("torch", "triton"):
        layer.backend = backend
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5, msg=backend)
    layer.backend = "torch"
    layer(x).square().sum().backward()
    assert a.w_gate_up_E2FH.grad.dtype == torch.bfloat16
    groups = {g["name"]: g for g in stored.PLAN["groups"]}
    assert groups["a"]["bytes_per_param"] == 2 and groups["b"]["bytes_per_param"] == 4


def test_groups_default_to_the_layer_dtype_and_the_shared_expert_keeps_it():
    from moec.errors import SpecError
    from moec.spec import load_spec_text

    spec = load_spec_text(BASE + "shared: {ffn: 8}\n")[0]
    assert [g.dtype for g in spec.experts] == ["fp32", "fp32"] and spec.shared.dtype == "fp32"
    bf16 = load_spec_text(BASE.replace("dtype: fp32", "dtype: bf16"))[0]
    assert [g.dtype for g in bf16.experts] == ["bf16", "bf16"]
    with pytest.raises(SpecError, match="shared.dtype"):
        load_spec_text(BASE + "shared: {ffn: 8, dtype: int8}\n")


def test_rows_go_on_the_wire_in_the_layer_dtype_unless_asked():
    from moec.errors import SpecError
    from moec.spec import load_spec_text

    assert load_spec_text(BASE)[0].comm.wire_dtype == "fp32"
    assert load_spec_text(BASE + "comm: {wire_dtype: bf16}\n")[0].comm.wire_dtype == "bf16"
    with pytest.raises(SpecError, match="comm.wire_dtype"):
        load_spec_text(BASE + "comm: {wire_dtype: fp8}\n")


def test_launch_run_py_commands_on_cpu(tmp_path):
    """The generated launch/run.py in one process: smoke, train and bench run; bad --tokens is a
    usage error (exit 2) that names the option."""
    import subprocess
    import sys

    from moec.codegen import generate
    from moec.spec import load_spec_text
    from tests.genutil import write_files

    spec = load_spec_text(BASE + "router: {top_k: 2}\nbalance: {aux_loss: 0.01}\n")[0]
    run_py = write_files(generate(spec), tmp_path / "t") / "launch" / "run.py"

    def run(*args):
        done = subprocess.run([sys.executable, str(run_py), *args], capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr

    code, out = run("smoke", "--tokens", "6")
    assert code == 0 and "smoke     ok" in out, out
    for args in (
        ("train", "--tokens", "8", "--steps", "2"),
        ("bench", "--tokens", "8", "--repeat", "1"),
    ):
        code, out = run(*args)
        assert code == 0, (args, out)
    code, out = run("smoke", "--tokens", "3")
    assert code == 2 and "--tokens must be even (got 3)" in out, out
    code, out = run("bench", "--tokens", "0")
    assert code == 2 and "--tokens must be at least 1 (got 0)" in out, out


def test_pooled_load_balance_loss_is_transformers_model_level_loss():
    """transformers pools slots and probabilities over all MoE layers (and leaves padding out with
    the attention mask) before multiplying; the package gives the same from the layers' kept
    router logits. Per layer and unmasked it is the layer's own aux loss."""
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    pkg = build_package(BASE + "router: {top_k: 2}\nbalance: {aux_loss: 0.01}\n")
    torch.manual_seed(11)
    layers = [pkg.MoELayer(), pkg.MoELayer()]
    x = torch.randn(3, 5, 24)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    for layer in layers:
        layer.keep_router_logits = True
        layer(x)
        assert layer.router_logits.shape == (15, 7)
    logits = [layer.router_logits for layer in layers]
    pooled = pkg.router.pooled_load_balance_loss
    for m in (None, mask):
        want = hf.load_balancing_loss_func(tuple(logits), 7, 2, m)
        torch.testing.assert_close(pooled(logits, m), want, msg=f"mask {m is not None}")
    torch.testing.assert_close(pooled(logits[:1]), layers[0].aux_losses["load_balance"])
    mean_of_layers = sum(layer.aux_losses["load_balance"] for layer in layers) / 2
    assert not torch.allclose(pooled(logits), mean_of_layers), "pooling is not the mean"
    layers[0].keep_router_logits = False
    layers[0](x)
    assert layers[0].router_logits is None
