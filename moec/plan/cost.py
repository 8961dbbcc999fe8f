"""The planner's cost model: links, GPUs, expert roofline, collectives, overlap and memory.

Legend: G ranks, N nodes, E experts, T tokens, K top-k, H hidden, F expert width.
Units: time in µs, sizes in bytes, bandwidth in GB/s (1 GB/s = 1e3 bytes/µs), FLOP/s in TFLOP/s.

Collectives use an alpha-beta model per link class (intra-node NVLink, inter-node IB): one step over
a link costs ``alpha_us + peers * msg_us + bytes / bandwidth``. ``alpha_us`` is the fixed cost of a
collective step (launch, synchronisation: ~55 µs for NCCL all-to-all on 2 x H200, BENCH.md), and
``msg_us`` a per-peer cost that makes talking to thousands of peers expensive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
# The tensor-core rate an expert GEMM runs at: fp8 / int8 weights run W8A8 kernels; int4 is
# weight-only (W4A16), dequantised to bf16 in the kernel, so it computes at the bf16 rate.
COMPUTE_DTYPE = {
    "fp32": "bf16",
    "bf16": "bf16",
    "fp16": "bf16",
    "fp8": "fp8",
    "int8": "int8",
    "int4": "bf16",
}


@dataclass(frozen=True)
class ExpertShape:
    """One expert's MLP: ``H -> F (x2 with a GLU) -> H`` with weights stored in ``dtype``."""

    hidden: int  # H
    ffn: int  # F
    glu: bool = True
    dtype: str = "bf16"  # a key of DTYPE_BYTES

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {list(DTYPE_BYTES)}")

    @property
    def params(self) -> int:
        """Weight count: gate + up + down with a GLU (3·H·F), else up + down (2·H·F)."""
        return (3 if self.glu else 2) * self.hidden * self.ffn

    @property
    def weight_bytes(self) -> float:
        """Bytes of the weights at their storage precision (int4 = 0.5 byte per weight)."""
        return self.params * DTYPE_BYTES[self.dtype]

    @property
    def flops_per_token(self) -> float:
        """Multiply-adds x 2 for one token through the expert."""
        return 2.0 * self.params


@dataclass(frozen=True)
class Link:
    """One link class: ``time(bytes, peers) = alpha_us + peers * msg_us + bytes / (gb_per_s·1e3)``."""

    alpha_us: float
    gb_per_s: float
    msg_us: float = 0.0

    def time_us(self, nbytes: float, peers: int = 1) -> float:
        """Time of one step moving ``nbytes`` over this link class to ``peers`` peers."""
        return self.alpha_us + peers * self.msg_us + nbytes / (self.gb_per_s * 1e3)


@dataclass(frozen=True)
class GpuProfile:
    """Achievable (not datasheet) rates of one GPU and its default links."""

    name: str
    tflops: dict = field(hash=False)  # compute dtype -> dense TFLOP/s
    hbm_tb_per_s: float
    memory_gb: float
    intra: Link
    inter: Link
    source: str = ""

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s of an expert GEMM whose weights are stored in ``dtype``."""
        compute = COMPUTE_DTYPE[dtype]
        return self.tflops.get(compute, self.tflops["bf16"]) * 1e12


_IB_NDR = Link(alpha_us=20.0, gb_per_s=50.0, msg_us=2.0)  # one 400 Gb/s NIC per GPU
_MEASURED = 764.0 / 989.0  # BENCH.md: measured / datasheet bf16 GEMM rate on H100
_HBM = 3.02 / 3.35  # BENCH.md: measured / datasheet HBM copy rate on H100

PROFILES = {
    "h100": GpuProfile(
        "h100",
        {"bf16": 764.0, "fp8": 2 * 764.0, "int8": 2 * 764.0},
        3.02,
        80.0,
        Link(alpha_us=55.0, gb_per_s=370.0, msg_us=0.5),
        _IB_NDR,
        "BENCH.md: 764 TFLOP/s bf16 GEMM and 3.02 TB/s copy measured; fp8/int8 assumed 2x bf16",
    ),
    "h200": GpuProfile(
        "h200",
        {"bf16": 764.0, "fp8": 2 * 764.0, "int8": 2 * 764.0},
        4.8 * _HBM,
        141.0,
        Link(alpha_us=55.0, gb_per_s=311.0, msg_us=0.5),
        _IB_NDR,
        "H100 compute (same die); 4.8 TB/s datasheet x H100 measured ratio; NVLink fit from "
        "BENCH.md 2xH200 all_to_all (alpha 55 µs, 311 GB/s bus bandwidth at 1 GiB)",
    ),
    "a100": GpuProfile(
        "a100",
        {"bf16": 312.0 * _MEASURED, "int8": 624.0 * _MEASURED},
        2.04 * _HBM,
        80.0,
        Link(alpha_us=55.0, gb_per_s=230.0, msg_us=0.5),
        Link(alpha_us=20.0, gb_per_s=25.0, msg_us=2.0),
        "datasheet (312 bf16, 624 int8 TOPS, 2.04 TB/s) x H100 measured/datasheet ratios; no fp8",
    ),
    "b200": GpuProfile(
        "b200",
        {"bf16": 2250.0 * _MEASURED, "fp8": 4500.0 * _MEASURED, "int8": 4500.0 * _MEASURED},
        8.0 * _HBM,
        180.0,
        Link(alpha_us=55.0, gb_per_s=740.0, msg_us=0.5),
        _IB_NDR,
        "datasheet dense rates (2.25 PF bf16, 4.5 PF fp8, 8 TB/s) x H100 measured ratios",
    ),
    "cpu": GpuProfile(
        "cpu",
        {"bf16": 1.0},
        0.1,
        64.0,
        Link(alpha_us=100.0, gb_per_s=10.0),
        Link(alpha_us=100.0, gb_per_s=1.0),
        "a guess for a many-core server: ~1 TFLOP/s, 100 GB/s, gloo over loopback/TCP",
    ),
}


def fit_alpha_beta(sizes_bytes, times_us, relative: bool = False) -> Link:
    """Least-squares fit of ``t = alpha + bytes / bw`` to measurements.

    sizes_bytes: bytes each point moved over the link (for all-to-all: bytes sent to other ranks).
    times_us: measured times. relative: minimise relative rather than absolute error (weights
    small messages more, so alpha comes out closer to the latency floor). Returns a :class:`Link`.
    """
    x = np.asarray(sizes_bytes, dtype=np.float64)
    t = np.asarray(times_us, dtype=np.float64)
    if x.shape != t.shape or x.size < 2:
        raise ValueError("need at least two (size, time) points of equal length")
    a = np.stack([np.ones_like(x), x], axis=1)
    w = 1.0 / t if relative else np.ones_like(t)
    (alpha, beta), *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
    if beta <= 0:
        raise ValueError("times do not grow with size; cannot fit a bandwidth")
    return Link(alpha_us=max(float(alpha), 0.0), gb_per_s=1.0 / (float(beta) * 1e3))


# ---------------------------------------------------------------- roofline


def token_cost_us(shape: ExpertShape, gpu: GpuProfile) -> float:
    """Compute-bound time of one token through the expert (µs): the per-token placement cost."""
    return shape.flops_per_token / gpu.peak_flops(shape.dtype) * 1e6


def expert_time_us(shape: ExpertShape, tokens: float, gpu: GpuProfile, act_bytes: int = 2) -> float:
    """Roofline time of one expert on ``tokens`` tokens: max(FLOPs / peak, bytes / HBM).

    Bytes are the weights at their precision (read once if ``tokens > 0``) plus the tokens'
    input and output activations ``2 * tokens * H * act_bytes``.
    """
    if tokens <= 0:
        return 0.0
    flops = tokens * shape.flops_per_token
    nbytes = shape.weight_bytes + 2.0 * tokens * shape.hidden * act_bytes
    return max(flops / gpu.peak_flops(shape.dtype), nbytes / (gpu.hbm_tb_per_s * 1e12)) * 1e6


def rank_compute_us(shapes, tokens_E, gpu: GpuProfile) -> float:
    """Roofline time of one rank's experts (run one after another): ``sum_e expert_time_us``."""
    return float(sum(expert_time_us(s, t, gpu) for s, t in zip(shapes, tokens_E, strict=True)))


# ---------------------------------------------------------------- collectives


def dispatch_traffic(share_EG, probs_E, tokens_G, top_k: int, bytes_per_token: float, node_G):
    """Expected dispatch bytes of an MoE layer: ``(send_GG, unique_GN)``.

    share_EG: fraction of expert e's tokens served on rank g (rows sum to 1, from the placement).
    probs_E: probability that one top-k pick is expert e (trace counts / their sum).
    tokens_G: tokens each rank routes. bytes_per_token: H x wire bytes.
    send_GG[s, d]: bytes s sends to d, each token sent once per destination rank; unique_GN[s, n]:
    bytes s must send to node n when a token crosses to a node once (hierarchical dispatch).
    Picks are treated as independent: P(token hits d) = 1 - (1 - r_d)^K.
    """
    share_EG = np.asarray(share_EG, dtype=np.float64)
    node_G = np.asarray(node_G)
    r_G = np.asarray(probs_E, dtype=np.float64) @ share_EG
    nodes = int(node_G.max()) + 1
    q_N = np.bincount(node_G, weights=r_G, minlength=nodes)
    hit_G = 1.0 - (1.0 - np.clip(r_G, 0, 1)) ** top_k
    hit_N = 1.0 - (1.0 - np.clip(q_N, 0, 1)) ** top_k
    t_G = np.asarray(tokens_G, dtype=np.float64) * bytes_per_token
    return np.outer(t_G, hit_G), np.outer(t_G, hit_N)


def _split(send_GG: np.ndarray, node_G: np.ndarray):
    """Intra- and inter-node parts of a send matrix, self-sends removed."""
    same = node_G[:, None] == node_G[None, :]
    off = send_GG * (1.0 - np.eye(send_GG.shape[0]))
    return np.where(same, off, 0.0), np.where(same, 0.0, off)


def _step_us(link: Link, bytes_G: np.ndarray, peers_G: np.ndarray) -> float:
    """Slowest rank's time for one step: alpha + its peers' msg cost + its bytes / bandwidth."""
    if not np.any(bytes_G > 0):
        return 0.0
    return float(np.max(link.alpha_us + peers_G * link.msg_us + bytes_G / (link.gb_per_s * 1e3)))


def flat_all_to_all_us(send_GG, node_G, intra: Link, inter: Link) -> float:
    """One all-to-all straight from every rank to every rank.

    A rank's NVLink and NIC traffic go in parallel; each side is bound by the larger of what the
    rank sends and receives. send_GG[s, d]: bytes s sends to d. node_G: node of each rank.
    """
    send_GG = np.asarray(send_GG, dtype=np.float64)
    node_G = np.asarray(node_G)
    intra_GG, inter_GG = _split(send_GG, node_G)
    return max(_side_us(intra_GG, intra), _side_us(inter_GG, inter))


def _side_us(part_GG: np.ndarray, link: Link) -> float:
    """One link class's share of a flat all-to-all: each rank bound by max(sent, received)."""
    bytes_G = np.maximum(part_GG.sum(1), part_GG.sum(0))
    peers_G = np.maximum((part_GG > 0).sum(1), (part_GG > 0).sum(0))
    return _step_us(link, bytes_G, peers_G)


def hierarchical_all_to_all_us(send_GG, node_G, intra: Link, inter: Link, unique_GN=None) -> float:
    """All-to-all in three steps: spread within the node, exchange across nodes, scatter.

    1. intra: each rank spreads its off-node data over the node's gpus (one rail each) and sends
       its on-node data directly; 2. inter: rail j of node m sends to rail j of node n, so the
       node's outbound bytes split evenly over its NICs and each rank talks to N-1 peers, not
       G-gpn; 3. intra: the receiving rail forwards each token to its target ranks.
    unique_GN[s, n]: bytes s sends to node n when tokens are de-duplicated per node (default:
    no de-duplication, the row sums of send_GG). Equals the flat time on one node.
    The generated runtime (comm.py, ``Dispatcher._dispatch_hierarchical``) sends these rows: one
    per (token, node) across nodes, on rail token % gpn, and one per (token, rank) within a node
    (send_GG counts tokens once per rank); its K ids and weights per row are not counted.
    """
    send_GG = np.asarray(send_GG, dtype=np.float64)
    node_G = np.asarray(node_G)
    nodes = int(node_G.max()) + 1
    if nodes == 1:
        return flat_all_to_all_us(send_GG, node_G, intra, inter)
    gpn = np.bincount(node_G)
    intra_GG, inter_GG = _split(send_GG, node_G)
    if unique_GN is None:
        unique_GN = np.stack([inter_GG[:, node_G == n].sum(1) for n in range(nodes)], axis=1)
    unique_GN = np.asarray(unique_GN, dtype=np.float64).copy()
    unique_GN[np.arange(len(node_G)), node_G] = 0.0
    keep = (gpn[node_G] - 1) / gpn[node_G]  # share of a rank's spread that leaves the rank
    peers_G = gpn[node_G] - 1
    step1 = np.maximum(intra_GG.sum(1), intra_GG.sum(0)) + unique_GN.sum(1) * keep
    out_N = np.bincount(node_G, weights=unique_GN.sum(1), minlength=nodes)
    in_N = unique_GN.sum(0)
    rail_N = np.maximum(out_N, in_N) / gpn
    step3 = inter_GG.sum(0) * keep
    return (
        _step_us(intra, step1, peers_G)
        + _step_us(inter, rail_N, np.full(nodes, nodes - 1))
        + _step_us(intra, step3, peers_G)
    )


def all_gather_us(gather_bytes_G, node_G, intra: Link, inter: Link) -> float:
    """All-gather of every rank's tokens (dispatch by replication; combine is the mirror).

    gather_bytes_G: bytes of tokens each rank contributes (T x H x wire bytes). Each rank receives
    everything over NVLink; a node's inbound off-node bytes split over its gpn NICs.
    """
    x_G = np.asarray(gather_bytes_G, dtype=np.float64)
    node_G = np.asarray(node_G)
    total = x_G.sum()
    gpn = np.bincount(node_G)
    node_bytes = np.bincount(node_G, weights=x_G)
    t_intra = intra.time_us(float(np.max(total - x_G)), int(gpn.max()) - 1)
    if len(gpn) == 1:
        return t_intra
    off_node = float(np.max((total - node_bytes) / gpn))
    return max(t_intra, inter.time_us(off_node, len(gpn) - 1))


@dataclass(frozen=True)
class DispatchChoice:
    """Predicted one-way dispatch times (µs) and the fastest method."""

    flat_us: float
    hierarchical_us: float
    all_gather_us: float
    choice: str  # "flat" | "hierarchical" | "all_gather"


def choose_dispatch(send_GG, node_G, intra, inter, gather_bytes_G, unique_GN=None):
    """Predict flat, hierarchical and all-gather dispatch and pick the fastest (ties: flat).

    Arguments as in :func:`flat_all_to_all_us`, :func:`hierarchical_all_to_all_us` and
    :func:`all_gather_us`. Returns a :class:`DispatchChoice`.
    """
    times = {
        "flat": flat_all_to_all_us(send_GG, node_G, intra, inter),
        "hierarchical": hierarchical_all_to_all_us(send_GG, node_G, intra, inter, unique_GN),
        "all_gather": all_gather_us(gather_bytes_G, node_G, intra, inter),
    }
    best = min(times, key=lambda k: (times[k], k != "flat"))
    return DispatchChoice(times["flat"], times["hierarchical"], times["all_gather"], best)


# ---------------------------------------------------------------- overlap


def pipeline_us(stages, chunks: int) -> float:
    """Time of a pipeline of stages over ``chunks`` equal chunks of the tokens.

    stages: ``(fixed_us, scaled_us)`` per stage, in order (e.g. dispatch, experts, combine); one
    chunk of a stage takes ``fixed_us + scaled_us / chunks``. The first chunk passes every stage,
    each later chunk adds the slowest stage: ``sum(s) + (chunks - 1) * max(s)``.
    """
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1 (got {chunks})")
    per_chunk = [fixed + scaled / chunks for fixed, scaled in stages]
    return sum(per_chunk) + (chunks - 1) * max(per_chunk)


def best_chunks(stages, max_chunks: int = 16) -> tuple[int, float]:
    """The chunk count in ``1..max_chunks`` with the least :func:`pipeline_us`, and that time."""
    return min(((c, pipeline_us(stages, c)) for c in range(1, max_chunks + 1)), key=lambda p: p[1])


def shared_overlap_us(dispatch_us: float, shared_us: float) -> float:
    """Dispatch with the shared expert run on another stream meanwhile: ``max`` not ``sum``."""
    return max(dispatch_us, shared_us)


def linear_stage(full_us: float, half_us: float) -> tuple[float, float]:
    """A stage's ``(fixed_us, scaled_us)`` from its time on all the tokens and on half of them.

    For an alpha-beta exchange the fixed part is the latency a chunk pays again; for a memory-bound
    expert it is reading the weights again. Clamped so both parts are >= 0 and they sum to the full.
    """
    fixed = min(max(full_us - 2.0 * (full_us - half_us), 0.0), full_us)
    return fixed, full_us - fixed


def moe_layer_us(
    stages, chunks: int, shared_us: float = 0.0, dispatch_overlaps: bool = True
) -> float:
    """A MoE layer: :func:`pipeline_us` of (dispatch, experts, combine) over ``chunks`` chunks, with
    the shared expert computed while the first chunk is dispatched (the experts wait for both).

    ``dispatch_overlaps=False`` (the hierarchical all-to-all: each hop's split sizes are read on the
    host from the rows the previous hop delivered, so the dispatches cannot wait behind experts):
    the chunks are dispatched one after another first, and only experts → combine are pipelined.
    """
    fixed, scaled = stages[0]
    first = fixed + scaled / chunks
    if not dispatch_overlaps:
        rest = (chunks - 1) * first + pipeline_us(stages[1:], chunks)
        return shared_overlap_us(first, shared_us) + rest
    return pipeline_us(stages, chunks) - first + shared_overlap_us(first, shared_us)


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds for its MoE layers."""

    weights: float
    grads: float
    optimizer: float  # Adam's two fp32 moments
    master: float  # fp32 master weights
    buffers: float  # dispatch + combine send/receive buffers
    activations: float

    @property
    def states(self) -> float:
        """Everything but activations: what stays resident between steps."""
        return self.weights + self.grads + self.optimizer + self.master + self.buffers

    @property
    def total(self) -> float:
        return self.states + self.activations


# Per parameter in training, besides the weights and grads: two fp32 Adam moments and an fp32 master.
ADAM_BYTES, MASTER_BYTES = 8.0, 4.0
OPTIMIZER_BYTES = ADAM_BYTES + MASTER_BYTES


def rank_memory(
    weight_bytes: float,
    params: float,
    train: bool,
    send_tokens: float,
    recv_tokens: float,
    hidden: int,
    ffn: int,
    glu: bool = True,
    wire_bytes: float = 2.0,
    act_bytes: float = 2.0,
) -> MemoryBreakdown:
    """Per-rank memory of the experts it hosts and the tokens it moves.

    weight_bytes / params: the hosted experts' weights at their precision, and their count.
    train: adds bf16 grads (``act_bytes``/param), two fp32 Adam moments (8 B) and an fp32 master
    copy (4 B). send_tokens / recv_tokens: token copies sent and received per layer (T x K and the
    rank's routed load); buffers hold them for dispatch and combine at ``wire_bytes``.
    Activations: training keeps x, the up/gate outputs and the activation per received token for
    backward; inference only holds the transient intermediate.
    """
    up = (2 if glu else 1) * ffn
    buffers = 2.0 * (send_tokens + recv_tokens) * hidden * wire_bytes
    if train:
        acts = recv_tokens * (hidden + up + ffn) * act_bytes
        grads, moments, master = act_bytes * params, ADAM_BYTES * params, MASTER_BYTES * params
        return MemoryBreakdown(weight_bytes, grads, moments, master, buffers, acts)
    return MemoryBreakdown(weight_bytes, 0.0, 0.0, 0.0, buffers, recv_tokens * up * act_bytes)
