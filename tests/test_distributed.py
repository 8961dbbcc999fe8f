"""The generated layer sharded over 4 gloo processes equals the single-process layer, forward and
backward: flat, hierarchical and all-gather dispatch, dp x ep, replicas, uneven experts per rank,
expert tensor parallelism, skewed routing with experts that receive no tokens, the all-to-alls
pipelined in 2 and 3 chunks (with empty chunks), a rank with no tokens, the shared expert
overlapping the dispatch (all three kinds); flat and hierarchical dispatch also through the Triton kernels (interpreted), where a
rank may hold none of a group's experts.
The flat all-to-all sends one row per (token, destination rank) pair; hierarchical dispatch (2 nodes
x 2 ranks) sends one row across nodes per (token, node) pair."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from moec.codegen import generate  # noqa: E402
from moec.spec import load_spec_text  # noqa: E402
from tests.genutil import write_files  # noqa: E402

BASE = """
hidden: 16
dtype: fp32
experts:
  - {name: a, count: 4, ffn: 8}
  - {name: b, count: 3, ffn: 12, activation: gelu}
shared: {ffn: 8}
router: {top_k: 2, normalize: sum}
balance: {aux_loss: 0.01}
"""

# int8, int4 and fp8 groups: the shards of an expert-tp group keep the unsharded layer's scales
QUANTIZED = BASE.replace(
    "activation: gelu}",
    "activation: gelu, dtype: int8}\n  - {name: c, count: 2, ffn: 8, dtype: int4}",
).replace("{name: a, count: 4, ffn: 8}", "{name: a, count: 4, ffn: 8, dtype: fp8}")
BASES = {"quantized_expert_tp2": QUANTIZED, "quantized_hierarchical": QUANTIZED}

CONFIGS = {
    "ep4_flat": "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\ncomm: {dispatch: all_to_all}\n",
    "dp2_ep2": "parallel: {dp: 4, ep: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n",
    "two_nodes_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical}\n"
    ),
    "replicas": (
        "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "placement: {strategy: replicate, redundant: 3}\n"
    ),
    "all_gather": "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\ncomm: {dispatch: all_gather}\n",
    "expert_tp2": "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n",
    "expert_tp2_all_gather": (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_gather}\n"
    ),
    "weight_on_input_hierarchical": (
        "weight_on: input\nparallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical}\n"
    ),
    "weight_on_input_flat": (
        "weight_on: input\nparallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_to_all}\n"
    ),
    "chunks2_replicas": (
        "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "placement: {strategy: replicate, redundant: 3}\ncomm: {dispatch: all_to_all, chunks: 2}\n"
    ),
    "chunks3_weight_on_input": (
        "weight_on: input\nparallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_to_all, chunks: 3}\n"
    ),
    "chunks2_expert_tp2": (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_to_all, chunks: 2}\n"
    ),
    # top-3 of 7 experts on 2 nodes: a token has 2 or 3 slots on one node, often a remote one
    "top3_replicas_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "placement: {strategy: replicate, redundant: 2}\ncomm: {dispatch: hierarchical}\n"
    ),
    # one ep rank per node: the rail is the whole ep group, the node groups have one rank
    "expert_tp2_hierarchical": (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical}\n"
    ),
    # top-3 of 7 experts on 2 ranks: every token has 2 or 3 slots on one rank, each scaled there
    "top3_ep2_chunks2_weight_on_input": (
        "weight_on: input\nparallel: {dp: 4, ep: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_to_all, chunks: 2}\n"
    ),
    "quantized_expert_tp2": (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
    ),
    "quantized_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical}\n"
    ),
    "chunks3_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical, chunks: 3}\n"
    ),
    "chunks2_top3_replicas_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "placement: {strategy: replicate, redundant: 2}\n"
        "comm: {dispatch: hierarchical, chunks: 2}\n"
    ),
    "chunks2_expert_tp2_hierarchical": (
        "parallel: {dp: 4, ep: 2, expert_tp: 2}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical, chunks: 2}\n"
    ),
    # the float32 layer's rows cross in bf16 (comm.wire_dtype), both ways
    "wire_bf16_chunks2": (
        "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_to_all, chunks: 2, wire_dtype: bf16}\n"
    ),
    "wire_bf16_hierarchical": (
        "parallel: {dp: 4, ep: 4}\ncluster: {nodes: 2, gpus_per_node: 2, gpu: cpu}\n"
        "comm: {dispatch: hierarchical, wire_dtype: bf16}\n"
    ),
    "wire_bf16_all_gather": (
        "parallel: {dp: 4, ep: 4}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
        "comm: {dispatch: all_gather, wire_dtype: bf16}\n"
    ),
}
WIRE = {name: torch.bfloat16 for name in CONFIGS if name.startswith("wire_bf16")}
# the sharded layer through the Triton kernels (under TRITON_INTERPRET=1, as the whole CPU test
# run) against the single-process layer in plain torch: the experts custom op, its kept
# pre-activations and grouped-GEMM backward on every rank's shard
TRITON = {
    f"{name}_triton": CONFIGS[name]
    for name in (
        "ep4_flat", "two_nodes_hierarchical", "replicas", "expert_tp2", "chunks3_weight_on_input",
        "top3_replicas_hierarchical", "quantized_expert_tp2", "chunks3_hierarchical",
    )
}  # fmt: skip
# one expert group, every expert on both ep ranks (replicas): the shards still count their slots in
# the backward, since the units they receive carry their peers' slots too
TRITON["one_group_replicated_triton"] = (
    "parallel: {dp: 4, ep: 2}\ncluster: {gpus_per_node: 4, gpu: cpu}\n"
    "placement: {strategy: replicate, redundant: 4}\n"
)
BASES["one_group_replicated_triton"] = BASE.replace(
    "  - {name: b, count: 3, ffn: 12, activation: gelu}\n", ""
)
CONFIGS |= TRITON
TOP_K = {
    "top3_replicas_hierarchical": 3,
    "top3_ep2_chunks2_weight_on_input": 3,
    "chunks2_top3_replicas_hierarchical": 3,
}
CHUNKS = {
    "chunks2_replicas": 2,
    "chunks3_weight_on_input": 3,
    "chunks2_expert_tp2": 2,
    "top3_ep2_chunks2_weight_on_input": 2,
    "chunks3_hierarchical": 3,
    "chunks2_top3_replicas_hierarchical": 2,
    "chunks2_expert_tp2_hierarchical": 2,
    "wire_bf16_chunks2": 2,
}
# tokens per rank (default 5, 8, 11, 14). In 3 chunks of at most 2 tokens, the last chunk is empty
# on every rank, and rank 0's 1 token leaves its second chunk empty too.
TOKENS = {"chunks3_weight_on_input": (1, 2, 2, 2), "chunks3_hierarchical": (1, 2, 2, 2)}
# a rank with no tokens at all (an idle rank) still takes part in every exchange
for _name in ("idle_rank_flat", "idle_rank_hierarchical", "idle_rank_all_gather"):
    TOKENS[_name] = (0, 4, 6, 8)
CONFIGS["idle_rank_flat"] = CONFIGS["chunks2_replicas"]
CHUNKS["idle_rank_flat"] = 2
CONFIGS["idle_rank_hierarchical"] = CONFIGS["two_nodes_hierarchical"]
CONFIGS["idle_rank_all_gather"] = CONFIGS["all_gather"]
# a float group stored in bf16 in the float32 layer (it computes in float32): sharded like any other
STORED = BASE.replace("{name: a, count: 4, ffn: 8}", "{name: a, count: 4, ffn: 8, dtype: bf16}")
for _name, _config in (
    ("stored_bf16_flat_triton", "ep4_flat"),
    ("stored_bf16_hierarchical", "two_nodes_hierarchical"),
    ("stored_bf16_expert_tp2", "expert_tp2"),
):
    CONFIGS[_name], BASES[_name] = CONFIGS[_config], STORED
TRITON["stored_bf16_flat_triton"] = CONFIGS["ep4_flat"]
for _name in TRITON:  # the Triton runs of a config keep its experts, top-k, chunks and tokens
    for _table in (BASES, TOP_K, CHUNKS, TOKENS):
        if _name.removesuffix("_triton") in _table:
            _table[_name] = _table[_name.removesuffix("_triton")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(pkg, rank: int, name: str) -> None:
    torch.manual_seed(0)
    full = pkg.MoELayer(distributed=False)
    with torch.no_grad():  # skew the routing: expert 0 is hot, so some experts get no tokens
        full.router.weight[0] *= 4.0
    sharded = pkg.MoELayer()
    assert sharded.dispatcher is not None
    # a shard's backward counts its slots: units carry its peers' slots too (even when replicas
    # give it every expert); the one-process layer of a single group runs on static rows
    assert not any(g.static_rows for g in sharded.groups.values())
    if name == "one_group_replicated_triton":  # the case that rule is for
        assert all(g.holds_all for g in sharded.groups.values()), name
    assert all(g.static_rows == (len(full.groups) == 1) for g in full.groups.values())
    sharded.load_unsharded_state_dict(full.state_dict())
    if name.startswith("stored_bf16"):  # the spec's bf16 group keeps its shards' weights in bf16
        assert sharded.groups["a"].w_down_EHF.dtype == torch.bfloat16, name
    if name in TRITON:  # the shards run the kernels, the single-process layer plain torch
        assert os.environ.get("TRITON_INTERPRET") == "1", "the CPU run interprets the kernels"
        full.backend, sharded.backend = "torch", "triton"
    assert pkg.comm.CHUNKS == CHUNKS.get(name, 1), name
    torch.manual_seed(100 + rank)
    tokens = TOKENS.get(name, (5, 8, 11, 14))[rank]  # uneven tokens per rank
    x = torch.randn(tokens, 16)
    g = torch.randn(tokens, 16)
    outs = {}
    for label, layer in (("full", full), ("sharded", sharded)):
        xr = x.clone().requires_grad_()
        if label == "sharded":
            with _schedule_log(layer) as (log, wire), _dispatch_log(layer.dispatcher) as dispatched:
                y = layer(xr)
        else:
            y = layer(xr)
        (y * g).sum().backward()
        outs[label] = (y.detach(), xr.grad)
    sharded.reduce_replica_grads()
    counted = {"hierarchical": _inter_node_rows, "all_to_all": _flat_rows}.get(pkg.comm.DISPATCH)
    if counted is not None:
        sent = counted(sharded.dispatcher, dispatched)
        dist.all_reduce(sent)  # a rank forwards its node's rows: only the sums must agree
    _check_schedule(pkg, log, name)  # after the collectives, so a failure cannot stall the others
    if counted is not None:
        rows, pairs, slots = sent.tolist()
        assert rows == pairs, (name, "rows sent", rows, "(token, destination) pairs", pairs)
        if TOP_K.get(name, 2) >= 3:
            assert pairs < slots, (name, "no token has 2 slots on one destination")
    # rows of activations (H = 16 columns) on the wire: in the layer's float32, or comm.wire_dtype
    assert wire and wire == {WIRE.get(name, torch.float32)}, (name, wire)
    tol = 3e-2 if name in WIRE else 1e-5  # bf16 rows: rounded once each way
    torch.testing.assert_close(
        outs["sharded"][0], outs["full"][0], atol=tol, rtol=tol, msg=f"{name} y"
    )
    torch.testing.assert_close(
        outs["sharded"][1], outs["full"][1], atol=tol, rtol=tol, msg=f"{name} dx"
    )
    # expert weights: the sharded copy sees the tokens of its whole ep group, the full layer only ours
    for group_name, group in sharded.groups.items():
        if getattr(group, "QUANT", None) is not None:  # frozen weights: no gradient
            continue
        full_group = full.groups[group_name]
        grad = full_group.w_down_EHF.grad
        grad = torch.zeros_like(full_group.w_down_EHF) if grad is None else grad.clone()
        dist.all_reduce(grad, group=sharded.dispatcher.ep_group)
        if sharded.dispatcher.etp_group is not None:
            dist.all_reduce(grad, group=sharded.dispatcher.etp_group)
        idx = [e - group.FIRST for e in group.experts]
        cols = slice(group.shard * group.width, (group.shard + 1) * group.width)
        want = grad[idx][:, :, cols]
        got = group.w_down_EHF.grad
        got = torch.zeros_like(want) if got is None else got
        # bf16-stored weights get bf16 gradients: the one-process ones are rounded per rank, then
        # summed over the ranks, so they may differ by a few bf16 steps
        gtol = 2e-2 if getattr(group, "STORED", None) is not None else max(tol, 1e-4)
        torch.testing.assert_close(
            got, want, atol=gtol, rtol=gtol, msg=f"{name} {group_name} dW_down"
        )


@contextlib.contextmanager
def _schedule_log(layer):
    """Log the all-to-alls ("wait" or "async"), all-gathers ("gather wait" or "gather async"),
    shared expert calls and local expert calls on a chunk's rows ("experts") made inside, in order;
    and the dtypes of the rows of activations they send (16 wide: the tests' hidden size)."""
    log, wire = [], set()
    real_all_to_all, real_all_gather = dist.all_to_all_single, dist.all_gather
    real_shared = layer._shared_expert
    comm = sys.modules[type(layer.dispatcher).__module__]
    real_run_experts = comm._run_experts

    def run_experts(*args):
        log.append("experts")
        return real_run_experts(*args)

    def note(rows):
        if rows.dim() == 2 and rows.shape[1] == 16 and rows.is_floating_point():
            wire.add(rows.dtype)

    def all_to_all(output, input, *args, **kwargs):
        log.append("async" if kwargs.get("async_op") else "wait")
        note(input)
        return real_all_to_all(output, input, *args, **kwargs)

    def all_gather(tensors, tensor, *args, **kwargs):
        log.append("gather async" if kwargs.get("async_op") else "gather wait")
        note(tensor)
        return real_all_gather(tensors, tensor, *args, **kwargs)

    def shared(x_TH):
        log.append("shared")
        return real_shared(x_TH)

    dist.all_to_all_single, dist.all_gather = all_to_all, all_gather
    layer._shared_expert = shared
    comm._run_experts = run_experts
    try:
        yield log, wire
    finally:
        dist.all_to_all_single, dist.all_gather = real_all_to_all, real_all_gather
        del layer._shared_expert
        comm._run_experts = real_run_experts


@contextlib.contextmanager
def _dispatch_log(dispatcher):
    """Log (topk_ids_TK, what it returned) of the hierarchical dispatches and flat all-to-all
    routes (``_route``: the units of every chunk) made inside."""
    log, ids_at = [], {"_dispatch_hierarchical": 1, "_route": 0}  # topk_ids_TK among the args
    reals = {name: getattr(dispatcher, name) for name in ids_at if hasattr(dispatcher, name)}

    def spy(real, at):
        def call(*args):
            out = real(*args)
            log.append((args[at], out))
            return out

        return call

    for name, real in reals.items():  # the package has only its own dispatch's methods
        setattr(dispatcher, name, spy(real, ids_at[name]))
    try:
        yield log
    finally:
        for name in reals:
            delattr(dispatcher, name)


def _flat_rows(dispatcher, dispatched) -> torch.Tensor:
    """[rows this rank sends in the flat all-to-all (to itself too, every chunk), its (token,
    destination rank) pairs, its kept slots]. The rows must be the pairs: a token goes to a rank
    once, whatever its slots there."""
    ((ids_TK, route),) = dispatched
    rows = sum(map(sum, route["send_CG"]))
    token_TK = torch.arange(ids_TK.shape[0]).unsqueeze(1).expand_as(ids_TK)
    kept_TK, ep = ids_TK >= 0, len(dispatcher.ep_group_ranks)
    dest_TK = dispatcher._holder(ids_TK.clamp(min=0), token_TK)
    pairs = torch.unique(token_TK[kept_TK] * ep + dest_TK[kept_TK]).numel()
    return torch.tensor([rows, pairs, int(kept_TK.sum())])


def _inter_node_rows(dispatcher, dispatched) -> torch.Tensor:
    """[rows this rank sends across nodes, its (token, other node) pairs, its slots on other nodes],
    over the dispatches of every chunk. Summed over the ranks, the rows must be the pairs: a token
    crosses to a node once."""
    sent = torch.zeros(3, dtype=torch.long)
    for ids_TK, (*_, state) in dispatched:
        rail = state["hops"][1]  # along the rail: the rail group's members are in node order
        rows = sum(rail.send) - rail.send[dist.get_rank(rail.group)]
        token_TK = torch.arange(ids_TK.shape[0]).unsqueeze(1).expand_as(ids_TK)
        node_TK = dispatcher._holder(ids_TK.clamp(min=0), token_TK) // dispatcher.per_node
        remote_TK = (ids_TK >= 0) & (node_TK != dispatcher.node)
        pairs = torch.unique(token_TK[remote_TK] * dispatcher.nodes + node_TK[remote_TK]).numel()
        sent += torch.tensor([rows, pairs, int(remote_TK.sum())])
    return sent


def _check_schedule(pkg, log: list[str], name: str) -> None:
    """Flat all-to-all: one counts exchange that waits, then every chunk's units on the wire while
    the shared expert runs, then each chunk's experts and its outputs sent back asynchronously.
    Hierarchical: every chunk's dispatch first, three all-to-alls per hop (split sizes, rows, their
    weights and codes), the rows crossing the nodes in flight (the first chunk's while the shared
    expert runs); then each chunk's experts, after which every earlier chunk's outputs go one hop
    further back and this chunk's start, asynchronously; then the hops left.
    All-gather: the shared expert runs while the rows, weights and ids are gathered."""
    assert log.count("shared") == 1, (name, log)
    exchanges = [e for e in log if not e.startswith("gather")]  # expert tp gathers first
    chunks = pkg.comm.CHUNKS
    if pkg.comm.DISPATCH == "all_to_all":  # a chunk's rows, then their slots; outputs back
        want = ["wait"] + ["async"] * 2 * chunks + ["shared"] + ["experts", "async"] * chunks
    elif pkg.comm.DISPATCH == "hierarchical":
        hop_2 = ["wait"] + ["async"] * 2  # the crossing: sizes, then rows and slots in flight
        want = ["wait"] * 3 + hop_2 + ["shared"] + ["wait"] * 3
        want += (["wait"] * 3 + hop_2 + ["wait"] * 3) * (chunks - 1)
        for i in range(chunks):  # after chunk i's experts, chunk j <= i starts hop i - j (of 3)
            want += ["experts"] + ["async"] * sum(i - j < 3 for j in range(i + 1))
        want += ["async"] * sum(max(0, 3 - (chunks - j)) for j in range(chunks))
    else:  # the counts gather waits; rows, weights and ids are in flight while the shared runs
        want = ["gather wait"] + ["gather async"] * 3 + ["shared", "experts"]
        exchanges = log[-6:]
    assert exchanges == want, (name, log)


def _worker(rank: int, world: int, port: int, packages: dict, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a short timeout turns a deadlock (one rank failing between collectives) into an error
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        for name, folder in packages.items():
            sys.path.insert(0, str(Path(folder).parent))
            pkg = __import__(Path(folder).name)
            try:
                _check(pkg, rank, name)
            except Exception:  # report every config, not just the first failure
                errors.put(f"[rank {rank}] {name}:\n{traceback.format_exc()}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sharded_layer_matches_single_process(tmp_path):
    packages = {}
    for name, extra in CONFIGS.items():
        base = BASES.get(name, BASE).replace("top_k: 2", f"top_k: {TOP_K.get(name, 2)}")
        spec = load_spec_text(f"name: {name}\n{base}{extra}")[0]
        packages[name] = str(write_files(generate(spec), tmp_path / name))
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(
        _worker, args=(4, _free_port(), packages, errors), nprocs=4, start_method="spawn"
    )
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, "\n".join(found)


@pytest.mark.dist
def test_generated_torchrun_script_smoke_on_cpu(tmp_path):
    """launch/torchrun.sh starts the plan's 4 ranks with gloo; smoke compares with one process."""
    import subprocess

    spec = load_spec_text(f"name: launched\n{BASE}{CONFIGS['two_nodes_hierarchical']}")[0]
    folder = write_files(generate(spec), tmp_path / "launched")
    env = dict(os.environ, PYTHON=sys.executable, NNODES="1", NPROC_PER_NODE="4")
    result = subprocess.run(
        ["bash", str(folder / "launch" / "torchrun.sh"), "smoke", "--tokens", "12"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke     ok" in result.stdout
    assert result.stdout.count("vs single process") == 4
