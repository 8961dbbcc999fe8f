"""Planner cost model: alpha-beta fits, roofline, collectives, overlap and memory; the chunk count
and shared-expert overlap the comm plan picks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moec.plan import run_passes
from moec.plan.cost import (
    PROFILES,
    ExpertShape,
    Link,
    all_gather_us,
    best_chunks,
    choose_dispatch,
    dispatch_traffic,
    expert_time_us,
    fit_alpha_beta,
    flat_all_to_all_us,
    hierarchical_all_to_all_us,
    linear_stage,
    moe_layer_us,
    pipeline_us,
    rank_memory,
    token_cost_us,
)
from moec.spec import load_spec_text

# BENCH.md, all_to_all_single on 2 x H200: bytes per rank -> median µs. Half of each rank's buffer
# goes to the other rank, so bytes on the wire are size / 2.
BENCH_A2A = {16 * 2**20: 88.0, 64 * 2**20: 172.0, 256 * 2**20: 526.0, 2**30: 1726.0}


@settings(max_examples=50, deadline=None)
@given(st.floats(1.0, 200.0), st.floats(5.0, 900.0))
def test_fit_recovers_known_constants(alpha, gbps):
    sizes = np.geomspace(1e3, 1e9, 12)
    times = alpha + sizes / (gbps * 1e3)
    for relative in (False, True):
        link = fit_alpha_beta(sizes, times, relative=relative)
        assert link.alpha_us == pytest.approx(alpha, rel=1e-6, abs=1e-6)
        assert link.gb_per_s == pytest.approx(gbps, rel=1e-6)


def test_fit_on_bench_numbers_is_close_to_the_h200_default():
    sizes = [s / 2 for s in BENCH_A2A]
    link = fit_alpha_beta(sizes, list(BENCH_A2A.values()), relative=True)
    h200 = PROFILES["h200"].intra
    assert (h200.alpha_us, h200.gb_per_s) == (55.0, 311.0)
    assert 250 < link.gb_per_s < 400 and 30 < link.alpha_us < 130
    assert h200.time_us(2**29) == pytest.approx(1726, rel=0.05)  # 1 GiB row, half on the wire
    with pytest.raises(ValueError, match="at least two"):
        fit_alpha_beta([1.0], [2.0])


def test_roofline_crossover_matches_bench():
    h100 = PROFILES["h100"]

    def crossover(shape):
        tokens = np.arange(1, 2000)
        compute = tokens * shape.flops_per_token / h100.peak_flops(shape.dtype) * 1e6
        times = np.array([expert_time_us(shape, t, h100) for t in tokens])
        return tokens[np.argmax(np.isclose(times, compute))]

    assert 200 <= crossover(ExpertShape(4096, 14336)) <= 320  # BENCH.md: ~295 tokens in bf16
    assert 50 <= crossover(ExpertShape(4096, 14336, dtype="int4")) <= 90  # ~74 with int4
    assert expert_time_us(ExpertShape(4096, 14336), 0, h100) == 0.0
    fp8, bf16 = ExpertShape(4096, 1024, dtype="fp8"), ExpertShape(4096, 1024)
    assert token_cost_us(fp8, h100) == pytest.approx(token_cost_us(bf16, h100) / 2)
    assert fp8.weight_bytes == bf16.weight_bytes / 2 == 3 * 4096 * 1024
    with pytest.raises(ValueError, match="unknown dtype"):
        ExpertShape(8, 8, dtype="fp4")


def test_flat_all_to_all_one_node_is_alpha_beta():
    link = Link(alpha_us=10.0, gb_per_s=100.0, msg_us=1.0)
    send = np.full((4, 4), 1e6)
    node_G = np.zeros(4, dtype=int)
    assert flat_all_to_all_us(send, node_G, link, link) == pytest.approx(10 + 3 + 3e6 / 1e5)
    assert hierarchical_all_to_all_us(send, node_G, link, link) == flat_all_to_all_us(
        send, node_G, link, link
    )


def moe_traffic(nodes, gpn, top_k, experts, tokens, hidden, seed):
    """Dispatch bytes of a balanced, contiguous placement with mildly skewed routing."""
    rng = np.random.default_rng(seed)
    num_g = nodes * gpn
    node_G = np.repeat(np.arange(nodes), gpn)
    share_EG = np.zeros((experts, num_g))
    share_EG[np.arange(experts), np.arange(experts) * num_g // experts] = 1.0
    probs_E = rng.dirichlet(np.full(experts, 4.0))
    send, unique = dispatch_traffic(
        share_EG, probs_E, np.full(num_g, tokens), top_k, hidden * 2, node_G
    )
    return send, unique, node_G


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 8),
    st.sampled_from([2, 4, 8]),
    st.integers(1, 8),
    st.integers(0, 1000),
    st.floats(1.0, 50.0),
)
def test_hierarchical_never_loses_when_nvlink_is_free(nodes, gpn, top_k, seed, inter_gbps):
    send, unique, node_G = moe_traffic(nodes, gpn, top_k, 64, 512, 1024, seed)
    free = Link(alpha_us=0.0, gb_per_s=1e9)
    inter = Link(alpha_us=20.0, gb_per_s=inter_gbps, msg_us=2.0)
    flat = flat_all_to_all_us(send, node_G, free, inter)
    hier = hierarchical_all_to_all_us(send, node_G, free, inter, unique)
    assert hier <= flat * (1 + 1e-9)


@pytest.mark.parametrize("nodes", [2, 4, 8])
def test_hierarchical_beats_flat_over_slow_inter_node_links(nodes):
    send, unique, node_G = moe_traffic(nodes, 8, 8, 256, 4096, 7168, seed=0)
    h100 = PROFILES["h100"]
    flat = flat_all_to_all_us(send, node_G, h100.intra, h100.inter)
    hier = hierarchical_all_to_all_us(send, node_G, h100.intra, h100.inter, unique)
    assert hier < flat
    gather = np.full(len(node_G), 4096 * 7168 * 2.0)
    choice = choose_dispatch(send, node_G, h100.intra, h100.inter, gather, unique)
    assert choice.choice == min(
        ("flat", "hierarchical", "all_gather"),
        key=lambda k: getattr(choice, f"{k}_us"),
    )


def test_dispatch_traffic_counts_each_token_once_per_rank():
    send, unique, node_G = moe_traffic(2, 4, 1, 16, 100, 8, seed=1)
    assert np.allclose(send.sum(1), 100 * 16)  # top-1: every token goes to exactly one rank
    assert np.allclose(unique.sum(1), 100 * 16)
    send8, unique8, _ = moe_traffic(2, 4, 8, 16, 100, 8, seed=1)
    assert np.all(unique8.sum(1) < send8.sum(1))  # de-duplication per node pays off


def hierarchical_rows(dest_GTK: np.ndarray, gpn: int) -> np.ndarray:
    """Rows each rank sends and receives per hop of the generated hierarchical dispatch (comm.py,
    ``Dispatcher._dispatch_hierarchical``) -> rows[hop, sent | received, rank]. dest_GTK: the rank
    of each slot. Hop 1: one row per (token, rank) to the ranks of its own node, one per (token,
    other node) to the rail token % gpn; hop 2: rail to rail across nodes; hop 3: one row per
    (token, rank) from the rail to that node's ranks. Self-sends cost nothing."""
    rows = np.zeros((3, 2, dest_GTK.shape[0]))

    def send(hop, src, dst):
        if src != dst:
            rows[hop, 0, src] += 1
            rows[hop, 1, dst] += 1

    for s, dest_TK in enumerate(dest_GTK):
        for t, dest_K in enumerate(dest_TK):
            ranks = set(dest_K.tolist())
            for d in ranks:
                if d // gpn == s // gpn:
                    send(0, s, d)
            for node in {d // gpn for d in ranks} - {s // gpn}:
                rail, far = s // gpn * gpn + t % gpn, node * gpn + t % gpn
                send(0, s, rail)
                send(1, rail, far)
                for d in ranks:
                    if d // gpn == node:
                        send(2, far, d)
    return rows


def test_hierarchical_model_counts_the_rows_the_runtime_sends():
    """The expected bytes of hierarchical dispatch are the rows the generated runtime sends: across
    nodes one per (token, node), not one per slot, spread over the rails; within nodes one per
    (token, rank). Top-4 picks over 2 nodes x 4 ranks, drawn independently as the model assumes."""
    rng = np.random.default_rng(0)
    nodes, gpn, experts, top_k, tokens = 2, 4, 16, 4, 1000
    node_G = np.repeat(np.arange(nodes), gpn)
    holder_E = np.arange(experts) * len(node_G) // experts
    share_EG = np.zeros((experts, len(node_G)))
    share_EG[np.arange(experts), holder_E] = 1.0
    probs_E = rng.dirichlet(np.full(experts, 4.0))
    dest_GTK = holder_E[rng.choice(experts, size=(len(node_G), tokens, top_k), p=probs_E)]
    rows = hierarchical_rows(dest_GTK, gpn)
    send, unique = dispatch_traffic(share_EG, probs_E, np.full(len(node_G), tokens), 4, 1.0, node_G)
    one, free = Link(0.0, 1e-3), Link(0.0, 1e12)  # 1 row (1 byte) per µs; free
    inter_us = hierarchical_all_to_all_us(send, node_G, free, one, unique)
    assert inter_us == pytest.approx(rows[1].max(), rel=0.03)
    # one row per slot would load each rail with a node's remote slots / gpn: twice as many here
    slots_G = (node_G[dest_GTK] != node_G[:, None, None]).sum((1, 2))
    assert np.bincount(node_G, weights=slots_G).max() / gpn > 1.5 * inter_us
    intra_us = hierarchical_all_to_all_us(send, node_G, one, free, unique)
    assert intra_us == pytest.approx(rows[0].max() + rows[2].max(), rel=0.03)


def flat_rows(dest_GTK: np.ndarray, node_G: np.ndarray, per_slot: bool = False) -> np.ndarray:
    """Rows each rank sends and receives in the generated flat all-to-all (comm.py,
    ``Dispatcher._route``): one per (token, destination rank), whatever the token's slots there
    (``per_slot``: one per slot instead) -> rows[intra | inter, sent | received, rank].
    Self-sends cost nothing."""
    rows = np.zeros((2, 2, len(node_G)))
    for s, dest_TK in enumerate(dest_GTK):
        for dest_K in dest_TK:
            for d in dest_K.tolist() if per_slot else set(dest_K.tolist()):
                if d == s:
                    continue
                side = int(node_G[d] != node_G[s])
                rows[side, 0, s] += 1
                rows[side, 1, d] += 1
    return rows


def test_flat_model_counts_the_rows_the_runtime_sends():
    """The expected bytes of the flat all-to-all are the rows the generated runtime sends: one per
    (token, destination rank), not one per slot. Top-4 picks over 2 nodes x 4 ranks (2 experts
    each), drawn independently as the model assumes."""
    rng = np.random.default_rng(0)
    experts, top_k, tokens = 16, 4, 1000
    node_G = np.repeat(np.arange(2), 4)
    holder_E = np.arange(experts) * len(node_G) // experts
    share_EG = np.zeros((experts, len(node_G)))
    share_EG[np.arange(experts), holder_E] = 1.0
    probs_E = rng.dirichlet(np.full(experts, 4.0))
    dest_GTK = holder_E[rng.choice(experts, size=(len(node_G), tokens, top_k), p=probs_E)]
    rows = flat_rows(dest_GTK, node_G)
    send, _ = dispatch_traffic(share_EG, probs_E, np.full(len(node_G), tokens), top_k, 1.0, node_G)
    one, free = Link(0.0, 1e-3), Link(0.0, 1e12)  # 1 row (1 byte) per µs; free
    assert flat_all_to_all_us(send, node_G, one, free) == pytest.approx(rows[0].max(), rel=0.03)
    inter_us = flat_all_to_all_us(send, node_G, free, one)
    assert inter_us == pytest.approx(rows[1].max(), rel=0.03)
    # one row per slot would load the busiest rank's NIC more than the model predicts
    assert flat_rows(dest_GTK, node_G, per_slot=True)[1].max() > 1.1 * inter_us


def test_all_gather_single_and_multi_node():
    link = Link(alpha_us=5.0, gb_per_s=100.0)
    one = all_gather_us(np.full(4, 1e6), np.zeros(4, dtype=int), link, link)
    assert one == pytest.approx(5.0 + 3e6 / 1e5)
    slow = Link(alpha_us=5.0, gb_per_s=1.0)
    two = all_gather_us(np.full(4, 1e6), np.array([0, 0, 1, 1]), link, slow)
    assert two == pytest.approx(5.0 + 1e6 / 1e3)  # 2 MB off-node over two NICs


def test_pipeline_formula():
    stages = [(10.0, 300.0), (0.0, 400.0), (10.0, 300.0)]
    assert pipeline_us(stages, 1) == pytest.approx(1020.0)
    assert pipeline_us(stages, 4) == pytest.approx(85 + 100 + 85 + 3 * 100)
    chunks, best = best_chunks(stages)
    assert best < pipeline_us(stages, 1) and 1 < chunks < 16
    with pytest.raises(ValueError):
        pipeline_us(stages, 0)


def test_linear_stage_and_shared_overlap():
    assert linear_stage(100.0, 60.0) == pytest.approx((20.0, 80.0))  # alpha 20 + 80 of bytes
    assert linear_stage(100.0, 50.0) == (0.0, 100.0)  # compute-bound: no fixed part
    assert linear_stage(100.0, 100.0) == (100.0, 0.0)  # latency only
    stages = [(10.0, 90.0), (0.0, 200.0), (10.0, 90.0)]
    assert moe_layer_us(stages, 1) == pipeline_us(stages, 1) == 400.0
    assert moe_layer_us(stages, 1, shared_us=80.0) == 400.0  # hidden behind the dispatch
    assert moe_layer_us(stages, 1, shared_us=130.0) == 430.0  # the experts wait for it
    # in 2 chunks the shared expert overlaps the first chunk's dispatch only (10 + 45 µs)
    assert moe_layer_us(stages, 2, shared_us=80.0) == pipeline_us(stages, 2) + 25.0


def test_dispatch_first_pipelines_only_experts_and_combine():
    """The hierarchical all-to-all dispatches every chunk first (55 µs each in 2 chunks), then
    pipelines experts → combine: 55 + 55 + (100 + 55) + 100; sharing the first chunk's dispatch
    with the shared expert as before. In one chunk it is the plain serial sum."""
    stages = [(10.0, 90.0), (0.0, 200.0), (10.0, 90.0)]
    assert moe_layer_us(stages, 1, dispatch_overlaps=False) == moe_layer_us(stages, 1) == 400.0
    assert moe_layer_us(stages, 2, dispatch_overlaps=False) == 55 + 55 + 155 + 100
    assert moe_layer_us(stages, 2, 80.0, dispatch_overlaps=False) == 80 + 55 + 155 + 100
    assert moe_layer_us(stages, 2, dispatch_overlaps=False) > moe_layer_us(stages, 2)


_STAGE = st.tuples(st.floats(0.0, 500.0), st.floats(0.0, 5000.0))


@given(st.tuples(_STAGE, _STAGE, _STAGE), st.integers(1, 8), st.floats(0.0, 3000.0))
def test_dispatch_first_is_bounded_by_the_overlapped_and_the_serial_schedules(stages, chunks, sh):
    """Dispatching every chunk first never beats overlapping the dispatch too, and never loses to
    running the chunks' stages one after another (dispatch first, then experts → combine serially);
    in one chunk all three are the same."""
    first = stages[0][0] + stages[0][1] / chunks  # one chunk's dispatch
    serial = (
        max(first, sh) + (chunks - 1) * first + sum(f + s / chunks for f, s in stages[1:]) * chunks
    )
    first_us = moe_layer_us(stages, chunks, sh, dispatch_overlaps=False)
    assert moe_layer_us(stages, chunks, sh) <= first_us * (1 + 1e-9) + 1e-9
    assert first_us <= serial * (1 + 1e-9) + 1e-9
    if chunks == 1:
        assert first_us == pytest.approx(moe_layer_us(stages, 1, sh)) == pytest.approx(serial)


def _plan(links: str, comm: str = "{}", extra: str = "", nodes: int = 1):
    """A 4-rank all-to-all layer whose experts take ~67 µs per forward on an h100."""
    text = f"""name: chunked
hidden: 1024
experts: [{{name: e, count: 8, ffn: 1024}}]
router: {{top_k: 2}}
parallel: {{dp: 4, ep: 4}}
cluster: {{nodes: {nodes}, gpus_per_node: {4 // nodes}, gpu: h100, links: {{intra: {links}}}}}
workload: {{tokens_per_rank: 4096, mode: serve}}
comm: {comm}
{extra}"""
    return run_passes(load_spec_text(text)[0])


def test_auto_chunks_pipeline_when_compute_and_comm_are_comparable():
    plan = _plan("{latency_us: 5, gbps: 100}")  # ~115 µs each way against ~67 µs of experts
    assert plan.comm.dispatch == "all_to_all" and 1 < plan.comm.chunks <= 4
    phases = plan.cost.phases_us
    assert plan.cost.total_us < 0.95 * (phases["dispatch"] + phases["experts"] + phases["combine"])
    assert any(f"pipelined in {plan.comm.chunks} chunks" in note for note in plan.notes)
    assert not any("does not pipeline" in note for note in plan.notes)


@pytest.mark.parametrize(
    "links",
    [
        "{latency_us: 1, gbps: 100000}",  # communication is negligible
        "{latency_us: 1000, gbps: 100}",  # latency-bound: every chunk would pay it again
    ],
)
def test_auto_chunks_stay_one_when_pipelining_does_not_pay(links):
    plan = _plan(links)
    assert plan.comm.chunks == 1
    phases = plan.cost.phases_us
    serial = phases["dispatch"] + phases["experts"] + phases["combine"]
    assert plan.cost.total_us == pytest.approx(serial, abs=1e-2)


def test_explicit_chunks_are_honoured():
    assert _plan("{latency_us: 1, gbps: 100000}", "{chunks: 3}").comm.chunks == 3
    assert _plan("{latency_us: 5, gbps: 100}", "{chunks: 1}").comm.chunks == 1
    hierarchical = _plan(
        "{latency_us: 5, gbps: 100}", "{dispatch: hierarchical, chunks: 3}", nodes=2
    )
    assert hierarchical.comm.chunks == 3
    assert any("experts → combine (dispatch first) pipelined in 3" in n for n in hierarchical.notes)
    gathered = _plan("{latency_us: 5, gbps: 100}", "{dispatch: all_gather, chunks: 3}")
    assert gathered.comm.chunks == 1  # the all-gather runs in one chunk
    assert any("comm.chunks: 3 not used" in note for note in gathered.notes)


def test_shared_expert_overlaps_the_dispatch_in_the_prediction():
    bare = _plan("{latency_us: 5, gbps: 100}", "{chunks: 1}")
    dispatch_us = bare.cost.phases_us["dispatch"]
    small = _plan("{latency_us: 5, gbps: 100}", "{chunks: 1}", "shared: {ffn: 2048}")
    shared_us = small.cost.phases_us["shared (overlaps dispatch)"]
    assert 0 < shared_us < dispatch_us
    assert small.cost.total_us == pytest.approx(bare.cost.total_us)  # hidden behind the dispatch
    large = _plan("{latency_us: 5, gbps: 100}", "{chunks: 1}", "shared: {ffn: 8192}")
    shared_us = large.cost.phases_us["shared (overlaps dispatch)"]
    assert shared_us > dispatch_us  # the experts wait for the rest of it
    assert large.cost.total_us == pytest.approx(bare.cost.total_us + shared_us - dispatch_us)


def test_rank_memory_train_and_inference():
    train = rank_memory(2e9, 1e9, True, 1000, 2000, 4096, 1024)
    assert (train.grads, train.optimizer, train.master) == (2e9, 8e9, 4e9)
    assert train.buffers == 2 * 3000 * 4096 * 2
    assert train.total == train.states + train.activations > train.states
    infer = rank_memory(1e9, 1e9, False, 1000, 2000, 4096, 1024)
    assert infer.grads == infer.optimizer == infer.master == 0.0
    assert infer.activations < train.activations
