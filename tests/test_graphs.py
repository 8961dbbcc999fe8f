"""``MoELayer.use_cuda_graphs()``: the generated layer's cache of forwards replayed from CUDA graphs.

CUDA graphs need a GPU (``tests/gpu`` replays real ones); here the cache's logic runs on CPU with a
stand-in for the capture that behaves like one: the capture computes nothing useful (it records), the
outputs are tensors that each replay overwrites in place, and a replay reads its input tensor.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from tests.genutil import build_package

SPEC = """
name: graphed
hidden: 24
dtype: fp32
experts: [{count: 6, ffn: 16}]
shared: {ffn: 8}
router: {top_k: 2, normalize: sum}
balance: {aux_loss: 0.01, z_loss: 0.001}
"""


@pytest.fixture(scope="module")
def pkg():
    return build_package(SPEC)


def copy_into(static, fresh):
    """Write ``fresh``'s tensors into ``static``'s (same structure), as a replay does."""
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, (tuple, list)):
        for s, f in zip(static, fresh, strict=True):
            copy_into(s, f)
    elif isinstance(static, dict):
        assert static.keys() == fresh.keys()
        for k in static:
            copy_into(static[k], fresh[k])
    else:  # Python values (None, num_seqs, flags) are fixed at the capture
        assert static == fresh


class StandIn:
    """A capture on CPU: counts captures and replays."""

    def __init__(self, fail: bool = False):
        self.captures = self.replays = 0
        self.fail = fail

    def __call__(self, forward, static_x):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        out = forward(torch.zeros_like(static_x))  # recorded, not computed: values of no use

        def replay():
            self.replays += 1
            copy_into(out, forward(static_x))

        return replay, out


@pytest.fixture
def stand_in(pkg, monkeypatch):
    capture = StandIn()
    monkeypatch.setattr(pkg.graphs, "capture", capture)
    monkeypatch.setattr(pkg.graphs, "DEVICE_TYPES", ("cuda", "cpu"))
    return capture


def layer_of(pkg, seed=0):
    torch.manual_seed(seed)
    return pkg.MoELayer(torch.float32).eval()


def eager(layer, x):
    """The eager forward's output and state, on a copy of the layer without graphs."""
    ref = copy.deepcopy(layer)
    ref.cuda_graphs = None
    with torch.no_grad():
        y = ref(x)
    return y, ref.aux_losses, ref.router_logits


def test_second_forward_of_a_shape_replays_and_equals_eager(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs()
    layer.keep_router_logits = True
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(5, 24)
            y = layer(x)
            want_y, want_losses, want_logits = eager(layer, x)
            torch.testing.assert_close(y, want_y, rtol=0, atol=0)
            assert set(layer.aux_losses) == set(want_losses) == {"load_balance", "z", "total"}
            for name, value in want_losses.items():
                torch.testing.assert_close(layer.aux_losses[name], value, rtol=0, atol=0)
            torch.testing.assert_close(layer.router_logits, want_logits, rtol=0, atol=0)
            assert (stand_in.captures, stand_in.replays) == (1, i)
    # what a replay returns is the caller's: the next replay does not overwrite it
    graph = next(iter(layer.cuda_graphs.graphs.values()))
    losses = layer.aux_losses
    kept_y, kept_total = y.clone(), losses["total"].clone()
    with torch.no_grad():
        layer(torch.randn(5, 24))
    assert y.data_ptr() != graph.out[0].data_ptr()
    # the losses are computed when read, from the replay's logits and selection: cloned too
    logits, ids = layer._losses[:2]
    graph_logits, graph_ids = graph.out[1]["_losses"][:2]
    assert logits.data_ptr() != graph_logits.data_ptr() and ids.data_ptr() != graph_ids.data_ptr()
    torch.testing.assert_close(y, kept_y, rtol=0, atol=0)
    torch.testing.assert_close(losses["total"], kept_total, rtol=0, atol=0)
    assert not torch.equal(layer.aux_losses["total"], kept_total)


def test_the_capturing_forward_leaves_the_eager_state(pkg, stand_in):
    """The stand-in capture computes on zeros, as a real one computes nothing: the layer's
    ``aux_losses`` after the first call must still be those of its input."""
    layer = layer_of(pkg).use_cuda_graphs()
    x = torch.randn(4, 24)
    with torch.no_grad():
        layer(x)
    _, want, _ = eager(layer, x)
    for name, value in want.items():
        torch.testing.assert_close(layer.aux_losses[name], value, rtol=0, atol=0)
    assert stand_in.captures == 1 and stand_in.replays == 0


def test_one_graph_per_shape_and_the_least_recently_used_goes(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs(max_tokens=64, max_graphs=2)
    with torch.no_grad():
        for shape in [(3, 24), (2, 4, 24), (3, 24), (7, 24), (2, 4, 24)]:
            x = torch.randn(shape)
            y = layer(x)
            assert y.shape == x.shape
            torch.testing.assert_close(y, eager(layer, x)[0], rtol=0, atol=0)
    # (3,24) capture; (2,4,24) capture; (3,24) replay; (7,24) capture, (2,4,24) evicted... no:
    # (3, 24) was used after (2, 4, 24), so (2, 4, 24) is the least recently used and goes
    assert stand_in.captures == 4 and stand_in.replays == 1
    assert [k[0] for k in layer.cuda_graphs.graphs] == [(7, 24), (2, 4, 24)]


def test_forwards_that_do_not_replay(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs(max_tokens=8)
    x = torch.randn(4, 24)
    layer(x)  # grad enabled and the parameters require it: training forward
    layer(x)
    with torch.no_grad():
        layer(torch.randn(9, 24))  # more tokens than max_tokens
        layer(torch.randn(9, 24))
        layer(torch.randn(0, 24))  # no tokens
        layer.train()
        layer(x)
        layer(x)
        layer.eval()
    assert stand_in.captures == 0
    for p in layer.parameters():  # frozen weights: grad mode alone does not stop a replay
        p.requires_grad_(False)
    layer(x)
    layer(x)
    assert (stand_in.captures, stand_in.replays) == (1, 1)
    layer.use_cuda_graphs(max_tokens=0)
    assert layer.cuda_graphs is None
    layer(x)
    assert stand_in.replays == 1


def test_no_graphs_on_cpu_without_the_stand_in(pkg, monkeypatch):
    capture = StandIn()
    monkeypatch.setattr(pkg.graphs, "capture", capture)  # DEVICE_TYPES stays ("cuda",)
    layer = layer_of(pkg).use_cuda_graphs()
    with torch.no_grad():
        for _ in range(2):
            layer(torch.randn(3, 24))
    assert capture.captures == 0


def test_replaced_tensors_drop_the_graphs_and_changed_values_do_not(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs()
    x = torch.randn(6, 24)
    with torch.no_grad():
        layer(x)
        layer.router.weight.mul_(-1.0)  # in place: the graph reads the new values
        torch.testing.assert_close(layer(x), eager(layer, x)[0], rtol=0, atol=0)
        assert (stand_in.captures, stand_in.replays) == (1, 1)
        layer.router.weight = torch.nn.Parameter(layer.router.weight.clone())  # a new tensor
        torch.testing.assert_close(layer(x), eager(layer, x)[0], rtol=0, atol=0)
        assert (stand_in.captures, stand_in.replays) == (2, 1)
        layer.load_state_dict(layer_of(pkg, seed=1).state_dict())  # copies in place
        torch.testing.assert_close(layer(x), eager(layer, x)[0], rtol=0, atol=0)
        assert (stand_in.captures, stand_in.replays) == (2, 2)


def test_settings_that_change_the_forward_get_their_own_graph(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs()
    x = torch.randn(6, 24)
    with torch.no_grad():
        layer(x)
        layer.keep_router_logits = True
        layer(x)
        assert layer.router_logits is not None
        layer.keep_router_logits = False
        layer(x)
        assert layer.router_logits is None
        layer(x.double().float())
    with torch.inference_mode():
        layer(x)
    assert stand_in.captures == 3 and stand_in.replays == 2


def test_a_forward_that_cannot_be_captured_warns_once_and_stays_eager(pkg, monkeypatch):
    capture = StandIn(fail=True)
    monkeypatch.setattr(pkg.graphs, "capture", capture)
    monkeypatch.setattr(pkg.graphs, "DEVICE_TYPES", ("cuda", "cpu"))
    layer = layer_of(pkg).use_cuda_graphs()
    x = torch.randn(5, 24)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"\(5, 24\) input could not be captured"):
            y = layer(x)
        torch.testing.assert_close(y, eager(layer, x)[0], rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            x2 = torch.randn(5, 24)
            torch.testing.assert_close(layer(x2), eager(layer, x2)[0], rtol=0, atol=0)
    assert capture.captures == 1
    _, want, _ = eager(layer, x2)
    torch.testing.assert_close(layer.aux_losses["total"], want["total"], rtol=0, atol=0)


def test_losses_are_read_from_the_replay_and_lazy_losses_has_its_own_graphs(pkg, stand_in):
    """A replay computes no losses (its forward keeps the logits and selection, as an eager
    inference forward does) unless ``lazy_losses`` is off; the two settings use different graphs,
    and the losses read after either equal the eager forward's."""
    layer = layer_of(pkg).use_cuda_graphs()
    calls, real = [], layer.router.losses
    layer.router.losses = lambda *a: calls.append(1) or real(*a)
    x = torch.randn(3, 24)
    with torch.no_grad():
        for lazy in (True, False, True, False):
            layer.lazy_losses = lazy
            before = len(calls)
            layer(x)
            assert isinstance(layer._losses, tuple if lazy else dict)
            if lazy:  # neither the capture nor a replay computed them
                assert len(calls) == before
            _, want, _ = eager(layer, x)
            for name, value in want.items():
                torch.testing.assert_close(layer.aux_losses[name], value, rtol=0, atol=0)
    assert stand_in.captures == 2 and stand_in.replays == 2
    assert len(layer.cuda_graphs.graphs) == 2


def test_copies_and_pickles_keep_the_settings_not_the_graphs(pkg, stand_in):
    layer = layer_of(pkg).use_cuda_graphs(max_tokens=32, max_graphs=3)
    with torch.no_grad():
        layer(torch.randn(2, 24))
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        cache = other.cuda_graphs
        assert cache is not layer.cuda_graphs
        assert (cache.max_tokens, cache.max_graphs, len(cache.graphs)) == (32, 3, 0)
    assert len(layer.cuda_graphs.graphs) == 1


@pytest.mark.parametrize("bad", [-1, 1.5, "8", True])
def test_bad_settings_name_the_argument(pkg, bad):
    layer = layer_of(pkg)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        layer.use_cuda_graphs(max_tokens=bad)
    with pytest.raises(ValueError, match="max_graphs must be a positive integer"):
        layer.use_cuda_graphs(max_graphs=bad)


def test_a_sharded_layer_runs_eagerly(monkeypatch):
    """A layer of an expert-parallel plan replays when built whole, and never once sharded (its
    forward exchanges rows with the other ranks)."""
    ep = build_package(SPEC + "parallel: {dp: 2, ep: 2}\ncluster: {gpus_per_node: 2, gpu: cpu}\n")
    capture = StandIn()
    monkeypatch.setattr(ep.graphs, "capture", capture)
    monkeypatch.setattr(ep.graphs, "DEVICE_TYPES", ("cuda", "cpu"))
    torch.manual_seed(0)
    layer = ep.MoELayer(torch.float32, distributed=False).eval().use_cuda_graphs()
    x = torch.randn(4, 24)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(layer(x), eager(layer, x)[0], rtol=0, atol=0)
        assert (capture.captures, capture.replays) == (1, 1)
        layer.dispatcher = object()  # as on a rank of the plan's process groups
        layer._forward = lambda x: 2 * x  # (the sharded forward needs those groups)
        for _ in range(2):
            torch.testing.assert_close(layer(x), 2 * x)
    assert (capture.captures, capture.replays) == (1, 1)
