"""Generated layers of real-model shapes in bf16 on CUDA (backend triton) against float32 torch.

Run on a GPU machine: ``pytest -m gpu tests/gpu/test_generated_gpu.py``. Needs only torch, triton
and pytest there: the packages are generated beforehand from ``bench/specs`` (one layer each, real
H / F / E / K) with ``moec build bench/specs/*.yaml --out-dir bench/generated`` and imported from
that folder.

The reference is the same layer in float32 with backend torch, holding only the experts the routing
hits (DeepSeek-V3's 256 experts are 45 GB in float32; its test also uses few tokens). Outputs, the
input gradient and the weight gradients of the hit experts must agree to a relative error
‖a − b‖ / ‖b‖ <= 2e-2. The whole-layer forward (router included) is compared on the tokens that the
bf16 and float32 routers send to the same experts.
"""

import copy
import gc
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

GENERATED = Path(__file__).resolve().parents[2] / "bench" / "generated"
TOKENS = {  # package -> tokens of the test (DeepSeek-V3 first: it needs most of an 80 GB GPU)
    "deepseek_v3": 8,  # <= 64 experts hit: the float32 reference and its gradients stay ~22 GB
    "mixtral_8x7b": 256,
    "qwen3_30b_a3b": 256,
    "olmoe_1b_7b": 256,
    "gpt_oss_20b": 256,
}
TOL = 2e-2
DEVICE = "cuda"


def load(name: str):
    if not (GENERATED / name / "__init__.py").exists():
        pytest.skip(
            f"run `moec build bench/specs/*.yaml --out-dir bench/generated` ({name} missing)"
        )
    if str(GENERATED) not in sys.path:
        sys.path.insert(0, str(GENERATED))
    return importlib.import_module(name)


def load_golden(name: str):
    """A package of ``generated/`` (the goldens of ``specs/*.yaml``: real models with their balancing
    losses, which ``bench/specs`` leave out), imported as ``golden_<name>`` beside ``load``'s."""
    alias = f"golden_{name}"
    if alias not in sys.modules:
        folder = Path(__file__).resolve().parents[2] / "generated" / name
        spec = importlib.util.spec_from_file_location(
            alias, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    return sys.modules[alias]


def free_memory() -> None:
    gc.collect()  # autograd graphs of custom ops hold weights in reference cycles
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def graph_replay(layer, x: torch.Tensor, new_x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` captured in a CUDA graph on a copy of x (after a warm-up call
    outside the capture) and replayed with new_x copied in; no grad."""
    with torch.no_grad():
        static_x = x.clone()
        layer(static_x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(new_x)
        graph.replay()
    return static_y


def randomize_biases(layer: torch.nn.Module) -> None:
    """Biases start at zero; give them values so that the test covers them."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name.split(".")[-1].startswith(("b_", "bias", "selection_bias")):
                t.copy_(0.1 * torch.randn(t.shape, device=DEVICE, generator=g))


def reference_layer(pkg, layer, hit: set[int]):
    """``layer`` in float32 with backend torch, holding only the routed experts in ``hit``."""
    ref = pkg.MoELayer(torch.float32, device="meta", backend="torch")
    for name, child in layer.named_children():
        if name != "groups":
            setattr(ref, name, copy.deepcopy(child).float())
    for name, g in layer.groups.items():
        held = [e for e in g.experts if e in hit]
        new = type(g)(torch.float32, device=DEVICE, experts=held)
        rows = g.local_index[torch.tensor(held, dtype=torch.long, device=DEVICE) - g.FIRST]
        with torch.no_grad():
            for pname, p in g.named_parameters():
                getattr(new, pname).copy_(p[rows].float())
        ref.groups[name] = new
    return ref.to(DEVICE)


def hit_rows(g, hit: set[int]) -> torch.Tensor:
    held = [e for e in g.experts if e in hit]
    return g.local_index[torch.tensor(held, dtype=torch.long, device=DEVICE) - g.FIRST]


@pytest.mark.parametrize("name", list(TOKENS))
def test_layer_bf16_triton_vs_fp32_torch(name):
    pkg = load(name)
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    randomize_biases(layer)
    T, H = TOKENS[name], pkg.layer.HIDDEN
    x = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)
    gy = torch.randn(T, H, device=DEVICE, dtype=torch.bfloat16)

    # Experts (routing given: the layer's own Triton routing kernel), forward and backward.
    with torch.no_grad():
        ids, w, _ = layer.route(x)
    hit = set(ids.flatten().tolist()) - {-1}
    x_bf = x.clone().requires_grad_()
    y = layer.experts(x_bf, ids, w)
    y.backward(gy)
    grads = {  # the hit experts' rows only, then free the full-size gradients
        (gname, pname): p.grad[hit_rows(g, hit)].float()
        for gname, g in layer.groups.items()
        for pname, p in g.named_parameters()
    }
    layer.zero_grad(set_to_none=True)
    free_memory()

    ref = reference_layer(pkg, layer, hit)
    x32 = x.float().requires_grad_()
    y32 = ref.experts(x32, ids, w.float())
    y32.backward(gy.float())
    errs = {"y": rel_err(y, y32), "dx": rel_err(x_bf.grad, x32.grad)}
    for (gname, pname), grad in grads.items():
        errs[f"d{gname}.{pname}"] = rel_err(grad, getattr(ref.groups[gname], pname).grad)
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs

    # The whole layer, router included, on the tokens both routers send to the same experts.
    with torch.no_grad():
        y_full = layer(x)
        y_full32 = ref(x.float())
        ids32 = ref.route(x.float())[0]
    same = (ids.sort(-1).values == ids32.sort(-1).values).all(-1)
    print(name, f"routing agrees on {same.float().mean().item():.1%} of tokens")
    assert same.float().mean() >= 0.8
    assert rel_err(y_full[same], y_full32[same]) <= TOL
    del layer, ref, grads
    free_memory()


def test_generated_layer_compiles_and_replays_in_a_cuda_graph():
    """``torch.compile(layer, fullgraph=True)`` (inductor) of a generated layer equals eager,
    forward and backward, and the eager forward replays from a CUDA graph."""
    pkg = load("qwen3_30b_a3b")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    x = torch.randn(256, pkg.layer.HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = layer(xe)
    ye.float().square().mean().backward()
    grad_e = layer.groups["routed"].w_down_EHF.grad.clone()
    layer.zero_grad(set_to_none=True)
    yc = torch.compile(layer, fullgraph=True)(xc)
    yc.float().square().mean().backward()
    assert rel_err(yc, ye) <= 1e-2 and rel_err(xc.grad, xe.grad) <= 2e-2
    assert rel_err(layer.groups["routed"].w_down_EHF.grad, grad_e) <= 2e-2

    with torch.no_grad():
        torch.testing.assert_close(graph_replay(layer, x, x.flip(0)), layer(x.flip(0)))
    del layer


def test_training_step_replays_in_a_cuda_graph():
    """A whole training step (forward and backward) of a generated layer captured in a CUDA graph
    (the backward then runs on all T*K slots: no host sync) replays to the gradients of an eager
    step, for a new input copied into the captured one."""
    pkg = load("olmoe_1b_7b")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(512, pkg.layer.HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    static_x = x.clone().requires_grad_()

    def step(layer=layer):
        layer(static_x).backward(gy)

    side = torch.cuda.Stream()  # warm up (compile the kernels) outside the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layer.zero_grad(set_to_none=True)
            static_x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_x = x.flip(0)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    got = [static_x.grad.clone()] + [p.grad.clone() for p in params]

    xe = new_x.clone().requires_grad_()
    for p in params:
        p.grad = None
    layer(xe).backward(gy)
    want = [xe.grad] + [p.grad for p in params]
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-2
    del step, layer, graph
    free_memory()


def test_training_knobs_give_the_same_gradients():
    """The backward's variants on a one-group layer agree on the GPU: the default (pre-activations
    kept, static rows: no host sync), the pre-activations recomputed (``keep_preactivations=False``)
    and the exact rows (the slots counted, as for several groups)."""
    pkg = load("qwen3_30b_a3b")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    (group,) = layer.groups.values()
    assert group.static_rows and group.keep_preactivations
    params = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(512, pkg.layer.HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    grads = {}
    for name, keep, static in (("default", True, True), ("recompute", False, True),
                               ("exact rows", True, False)):  # fmt: skip
        group.keep_preactivations, group.static_rows = keep, static
        for p in params:
            p.grad = None
        xb = x.clone().requires_grad_()
        layer(xb).backward(gy)
        grads[name] = [xb.grad] + [p.grad for p in params]
    for name in ("recompute", "exact rows"):
        for a, b in zip(grads[name], grads["default"], strict=True):
            assert rel_err(a, b) <= 1e-2, name
    del layer, grads
    free_memory()


def test_mixed_precision_groups_through_the_kernels():
    """bf16 / int8 / int4 / fp8 expert groups in one layer: the Triton kernels (integer and fp8
    tiles, row scales on the accumulators) against the same layer's torch path (dequantised
    weights), forward and the input gradient."""
    pkg = load("mixed_precision")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    x = torch.randn(512, pkg.layer.HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    with torch.no_grad():
        ids, w, _ = layer.route(x)
    out = {}
    for backend in ("triton", "torch"):
        layer.backend = backend
        xb = x.clone().requires_grad_()
        y = layer.experts(xb, ids, w)
        y.backward(gy)
        out[backend] = (y.detach(), xb.grad)
    errs = {
        "y": rel_err(out["triton"][0], out["torch"][0]),
        "dx": rel_err(out["triton"][1], out["torch"][1]),
    }
    print("mixed_precision", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL, errs
    del layer


def test_expert_choice_compacts_its_slots_and_replays_in_a_cuda_graph():
    """Expert choice ([T, E] slots, mostly -1): eager calls with grad give the kernels each
    token's slots compacted to K' < E columns (a host sync) and match the torch path; under
    CUDA-graph capture the slots stay [T, E] (no sync), and the replay matches an eager call on
    the new input."""
    pkg = load("expert_choice")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton")
    x = torch.randn(512, pkg.layer.HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    kernels = pkg.backend.kernels()
    widths, real = [], kernels.moe_experts

    def spy(x_TH, ids_TK, *args, **kwargs):
        widths.append(ids_TK.shape[1])
        return real(x_TH, ids_TK, *args, **kwargs)

    kernels.moe_experts = spy
    try:
        y = layer(x)
        assert len(widths) == 1 and widths[0] < layer.router.weight.shape[0], widths
        layer.backend = "torch"
        assert rel_err(y, layer(x)) <= TOL
        layer.backend = "triton"
        replayed = graph_replay(layer, x, x.flip(0))
        assert widths[-1] == layer.router.weight.shape[0], widths  # captured: not compacted
        with torch.no_grad():
            assert rel_err(replayed, layer(x.flip(0))) <= TOL
    finally:
        kernels.moe_experts = real
    del layer


@pytest.mark.parametrize("name", ["olmoe_1b_7b", "qwen3_30b_a3b", "gpt_oss_20b", "mixed_precision"])
def test_use_cuda_graphs_replays_eval_forwards_bit_for_bit(name, monkeypatch):
    """``layer.use_cuda_graphs()``: from the second eval forward of a shape on, the layer replays a
    real CUDA graph (its eager forward is not called), and the output and ``aux_losses`` equal the
    eager forward's bit for bit; weights changed in place are read by the replay, replaced ones
    drop the graphs."""
    pkg = load(name)
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton").eval()
    randomize_biases(layer)
    H = pkg.layer.HIDDEN
    captures, eager_calls = [], []
    real_capture, real_forward = pkg.graphs.capture, layer._forward
    monkeypatch.setattr(pkg.graphs, "capture", lambda *a: captures.append(1) or real_capture(*a))
    layer._forward = lambda x: eager_calls.append(1) or real_forward(x)

    def check(x, layer=layer):
        y = layer(x)
        losses = dict(layer.aux_losses)
        want = real_forward(x)
        assert torch.equal(y, want)
        assert losses.keys() == layer.aux_losses.keys()
        for key, value in losses.items():
            assert torch.equal(value, layer.aux_losses[key]), key

    layer.use_cuda_graphs()
    shapes = [(1, H), (16, H), (256, H), (2, 8, H)]
    with torch.no_grad():
        for shape in shapes:
            for _ in range(3):
                check(torch.randn(shape, device=DEVICE, dtype=torch.bfloat16))
        # per shape one eager forward and the one the capture records; the rest replayed
        assert len(captures) == len(shapes) and len(eager_calls) == 2 * len(shapes)
        assert all(g is not None for g in layer.cuda_graphs.graphs.values())
        down = next(
            w
            for g in layer.groups.values()
            if (w := getattr(g, "w_down_EHF", None)) is not None and w.dtype == torch.bfloat16
        )
        down.mul_(0.5)  # in place: replayed with the new values
        check(torch.randn(16, H, device=DEVICE, dtype=torch.bfloat16))
        assert len(captures) == len(shapes) and len(eager_calls) == 2 * len(shapes)
        layer.router.weight = torch.nn.Parameter(layer.router.weight.clone())
        for _ in range(2):
            check(torch.randn(16, H, device=DEVICE, dtype=torch.bfloat16))
        assert len(captures) == len(shapes) + 1 and len(eager_calls) == 2 * len(shapes) + 2
        check(torch.randn(257, H, device=DEVICE, dtype=torch.bfloat16))  # eager: > max_tokens
        assert len(eager_calls) == 2 * len(shapes) + 3
    del layer
    free_memory()


def test_losses_of_replayed_forwards_are_computed_when_read():
    """specs/olmoe_1b_7b.yaml's layer (its load-balance loss) from CUDA graphs: no replay, capture
    or inference forward computes the losses; the first read of ``aux_losses`` does, once, and its
    values equal those a forward that computes them (gradient enabled) gives, bit for bit. With
    ``lazy_losses`` off, the replayed graph computes them."""
    pkg = load_golden("olmoe_1b_7b")
    free_memory()
    torch.manual_seed(0)
    layer = pkg.MoELayer(torch.bfloat16, device=DEVICE, backend="triton").eval().use_cuda_graphs()
    H = pkg.layer.HIDDEN
    calls, real_losses = [], layer.router.losses
    layer.router.losses = lambda *a: calls.append(1) or real_losses(*a)
    for shape, mode in [
        ((1, H), torch.no_grad),
        ((16, H), torch.inference_mode),
        ((2, 8, H), None),
    ]:
        for _ in range(3):
            x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
            before = len(calls)
            with mode() if mode else torch.no_grad():
                y = layer(x)
            assert len(calls) == before, "a forward computed the losses"
            got = layer.aux_losses
            assert len(calls) == before + 1 and set(got) == {"load_balance", "total"}
            with torch.enable_grad():
                want_y = layer._forward(x)
            want = layer.aux_losses
            assert len(calls) == before + 2 and want["total"].requires_grad
            assert torch.equal(y, want_y)
            for name, value in want.items():
                assert torch.equal(got[name], value.detach()), name
    assert len(layer.cuda_graphs.graphs) == 3
    layer.lazy_losses = False  # the forward, and so its graph, computes them
    x = torch.randn(16, H, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        with torch.no_grad():
            layer(x)
        got = layer._losses
        assert isinstance(got, dict)
        with torch.enable_grad():
            layer._forward(x)
        for name, value in layer.aux_losses.items():
            assert torch.equal(got[name], value.detach()), name
    assert len(layer.cuda_graphs.graphs) == 4
    del layer
    free_memory()
