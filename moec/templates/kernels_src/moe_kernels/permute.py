"""Group routing slots by expert and pad each expert's segment to the GEMM block size.

Two launches, no host sync, no atomics, deterministic (a stable sort: ascending slot within an
expert):

1. ``_count_kernel``: each program counts the slots of its chunk per expert → hist [chunks, E].
2. ``_scatter_kernel``: each program sums the histogram (total per expert, and the part of the chunks
   before its own), derives the padded expert offsets, scatters the slot ids of its chunk to their
   sorted positions, and fills its share of the per-block table (expert of each block, sentinel for
   padding rows).

The scatter walks its chunk SUB slots at a time. A slot's position is its expert's next free row
plus its rank among the step's slots of the same expert. With few experts the rank is a cumulative
sum over a [SUB, E] one-hot; from 64 experts (``PAIRS_MIN_EXPERTS``) it is a [SUB, SUB] comparison
of the step's slots, and the next free rows live in a scratch row of the program, read by expert
id, so no step is E wide. On an H200 (2026-12-02, bench/RESULTS.md) that made the alignment 1.2-2.7x
faster at 64-256 experts (Qwen3-30B-A3B T=4096: 27.6 -> 15.7 us; DeepSeek-V3 T=16384: 142.5 ->
53.1 us), and slower at 8 experts (Mixtral T=16384: 6.3 -> 9.6 us), which keep the one-hot.

Output sizes depend only on N, E and BLOCK_M (``max_padded_rows``), so the launches that follow can
be sized without reading anything back. Shape legend: T tokens, K top-k, N = T*K slots, E experts,
P padded rows, B = P / BLOCK_M blocks.
"""

import torch
import triton
import triton.language as tl

from .configs import cdiv, next_power_of_2
from .launch import launch
from .reference import Alignment, max_padded_rows


@triton.jit
def _local_expert(ids_ptr, offs, N, first_expert, E: tl.constexpr):
    """Local expert of each slot in ``offs`` and whether the slot belongs to this group."""
    raw = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
    ok = (offs < N) & (raw >= first_expert) & (raw < first_expert + E) & (raw >= 0)
    return raw - first_expert, ok


@triton.jit
def _count_kernel(
    ids_ptr,  # [N] int32 expert id per slot (-1 = dropped)
    hist_ptr,  # [chunks, E_PAD] int32 out
    N,
    chunk,
    first_expert,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    SUB: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    hist = tl.zeros([E_PAD], tl.int32)
    for start in range(0, chunk, SUB):
        offs = pid * chunk + start + tl.arange(0, SUB)
        e, ok = _local_expert(ids_ptr, offs, N, first_expert, E)
        hit = (e[:, None] == cols[None, :]) & ok[:, None]
        hist += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(hist_ptr + pid * E_PAD + cols, hist)


@triton.jit
def _scatter_kernel(
    ids_ptr,  # [N] int32
    hist_ptr,  # [chunks, E_PAD] int32 from _count_kernel
    run_ptr,  # [chunks, E_PAD] int32 scratch: each program's next free row per expert (if PAIRS)
    sorted_ptr,  # [P] int32 out: slot ids in expert order, sentinel N on padding rows
    eob_ptr,  # [B] int32 out: local expert of each block, -1 past the last expert
    offsets_ptr,  # [E + 1] int32 out: padded start row of each expert
    counts_ptr,  # [E] int32 out
    N,
    chunk,
    num_chunks,
    num_blocks,
    blocks_per_prog,
    first_expert,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK_ROWS: tl.constexpr,
    PAIRS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], tl.int32)
    before = tl.zeros([E_PAD], tl.int32)  # slots of each expert in the chunks before this one
    for c0 in range(0, num_chunks, CHUNK_ROWS):  # CHUNK_ROWS histogram rows per step
        c = c0 + tl.arange(0, CHUNK_ROWS)
        h = tl.load(hist_ptr + c[:, None] * E_PAD + cols[None, :], mask=(c < num_chunks)[:, None])
        total += tl.sum(h, axis=0)
        before += tl.sum(tl.where((c < pid)[:, None], h, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    if pid == 0:
        tl.store(offsets_ptr + cols, start, mask=cols < E)
        tl.store(offsets_ptr + E, tl.sum(padded, axis=0))
        tl.store(counts_ptr + cols, total, mask=cols < E)

    # Scatter this chunk's slots; `run` is the next free row of each expert.
    run = start + before
    if PAIRS:  # rank by comparing the step's slots; `run` in this program's scratch row
        # (a plain range: Triton pipelines loads that feed no dot only in loops given num_stages,
        # so no step reads the scratch row ahead of the step before it)
        i = tl.arange(0, SUB)
        row = run_ptr + pid * E_PAD
        tl.store(row + cols, run)
        tl.debug_barrier()
        for s in range(0, chunk, SUB):
            offs = pid * chunk + s + i
            e, ok = _local_expert(ids_ptr, offs, N, first_expert, E)
            e = tl.where(ok, e, -1)
            same = e[:, None] == e[None, :]  # [SUB, SUB]
            rank = tl.sum((same & (i[None, :] < i[:, None])).to(tl.int32), axis=1)
            later = tl.sum((same & (i[None, :] > i[:, None])).to(tl.int32), axis=1)
            base = tl.load(row + e, mask=ok, other=0)
            tl.store(sorted_ptr + base + rank, offs, mask=ok)
            tl.debug_barrier()  # every slot has read its expert's row before the last one moves it
            tl.store(row + e, base + rank + 1, mask=ok & (later == 0))
            tl.debug_barrier()
    else:  # rank by a cumulative sum over the step's one-hot
        for s in range(0, chunk, SUB):
            offs = pid * chunk + s + tl.arange(0, SUB)
            e, ok = _local_expert(ids_ptr, offs, N, first_expert, E)
            hit = ((e[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32)  # [SUB, E_PAD]
            rank = tl.cumsum(hit, axis=0) - 1
            pos = tl.sum(tl.where(hit != 0, run[None, :] + rank, 0), axis=1)
            tl.store(sorted_ptr + pos, offs, mask=ok)
            run += tl.sum(hit, axis=0)

    # Blocks never straddle experts, so one expert per block; rows past its count are padding.
    fill_end = tl.where(cols < E, start + total, 0)
    total_rows = tl.sum(padded, axis=0)
    rows = tl.arange(0, BLOCK_M)
    for b in range(pid * blocks_per_prog, tl.minimum((pid + 1) * blocks_per_prog, num_blocks)):
        row0 = b * BLOCK_M
        e = tl.sum((end <= row0).to(tl.int32), axis=0)  # experts that end at or before row0
        e = tl.where(row0 < total_rows, e, -1)
        tl.store(eob_ptr + b, e)
        last = tl.sum(tl.where(cols == e, fill_end, 0), axis=0)
        tl.store(
            sorted_ptr + row0 + rows, tl.full([BLOCK_M], N, tl.int32), mask=row0 + rows >= last
        )


# From this many experts the scatter ranks a step's slots by comparing them with each other.
PAIRS_MIN_EXPERTS = 64
# At most this many chunks (programs): about one wave; each program walks its chunk in steps.
MAX_CHUNKS = 128


def count_step(E_PAD: int) -> int:
    """Slots per step of a [step, E_PAD] one-hot of about 4096 elements, 32 to 128 slots: the
    count's (where its chunk allows), and the scatter's below PAIRS_MIN_EXPERTS. On an H200
    (2026-12-02, bench/RESULTS.md): at 64 experts, 64-slot steps made the alignment 1.08-1.11x
    faster than 32 (OLMoE-1B-7B, T=4096 and 16384); at 256 experts the count took 37.9 us with
    32-slot steps and 45.5 with 16 (DeepSeek-V3, T=16384, per-kernel profiles of two runs)."""
    return max(32, min(128, 4096 // E_PAD))


def align_by_expert(
    topk_ids_TK: torch.Tensor, num_experts: int, block_m: int, first_expert_id: int = 0
) -> Alignment:
    """Expert-sorted, BLOCK_M-padded slot order for the grouped GEMMs (two launches).

    Args:
        topk_ids_TK: [T, K] int32 global expert ids; -1 marks a dropped slot.
        num_experts: E, experts handled by this group (global ids first .. first+E-1).
        block_m: BLOCK_M of the GEMMs that consume the result.
        first_expert_id: the global id of this group's local expert 0; other ids are skipped.

    Returns:
        ``Alignment(sorted_slot_ids_P, expert_of_block_B, expert_offsets_E1, counts_E)``, with
        P = ``max_padded_rows(N, E, block_m)`` and B = P / block_m.
    """
    ids = topk_ids_TK.reshape(-1)
    ids = ids if ids.dtype == torch.int32 else ids.to(torch.int32)
    N, E, dev = ids.numel(), num_experts, ids.device
    P = max_padded_rows(N, E, block_m)
    B = P // block_m
    E_PAD = next_power_of_2(E)
    pairs = E >= PAIRS_MIN_EXPERTS
    # slots per step of the scatter: a [SUB, E_PAD] one-hot, or from PAIRS_MIN_EXPERTS a [SUB, SUB]
    # comparison
    SUB = 32 if pairs else count_step(E_PAD)
    # MAX_CHUNKS chunks at most, each a multiple of SUB slots.
    chunk = SUB * cdiv(max(N, 1), SUB * MAX_CHUNKS)
    # the count's steps: its one-hot's, as wide as divides the chunk (no fewer chunks for them)
    SUB_COUNT = min(count_step(E_PAD), chunk & -chunk)
    num_chunks = cdiv(max(N, 1), chunk)
    hist = torch.empty(num_chunks, E_PAD, dtype=torch.int32, device=dev)
    run = torch.empty(num_chunks, E_PAD, dtype=torch.int32, device=dev) if pairs else hist
    sorted_ids = torch.empty(P, dtype=torch.int32, device=dev)
    eob = torch.empty(B, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    launch(
        _count_kernel, (num_chunks,),
        ids, hist, N, chunk, first_expert_id, E=E, E_PAD=E_PAD, SUB=SUB_COUNT, num_warps=4,
    )  # fmt: skip
    launch(
        _scatter_kernel, (num_chunks,),
        ids, hist, run, sorted_ids, eob, offsets, counts, N, chunk, num_chunks, B,
        cdiv(B, num_chunks), first_expert_id,
        E=E, E_PAD=E_PAD, SUB=SUB, BLOCK_M=block_m,
        CHUNK_ROWS=min(next_power_of_2(num_chunks), max(1, 4096 // E_PAD)), PAIRS=pairs,
        num_warps=4,
    )  # fmt: skip
    return Alignment(sorted_ids, eob, offsets, counts)
