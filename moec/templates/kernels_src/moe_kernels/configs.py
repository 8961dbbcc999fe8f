"""Tile configurations of the grouped GEMMs: a shape- and token-count-aware default, and tables;
and the host-side helpers every launcher uses.

Shape legend: T tokens, H hidden, F expert width, E experts, K top-k.
"""

import functools
import os
from dataclasses import dataclass, replace

import torch

# Triton decides at decoration (import) time whether kernels are interpreted; follow the same
# decision, so CPU tensors reach the kernels exactly when the kernels can run on the CPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can take ``t``: a CUDA tensor, or any under the interpreter."""
    return t.is_cuda or INTERPRETED


def cdiv(a: int, b: int) -> int:
    """ceil(a / b), for launch code: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions in recent Triton, and each call from the host costs microseconds (a layer call
    made ~9 of them: ~40 µs of host time on this machine's CPU)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


# --------------------------------------------------------------------------------------------------
TAIL_DIVS = (2, 4)
FOLD_MS = (0, 16, 32, 64)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape of one grouped GEMM (all powers of two).

    ``tail_div``: with row blocks of ``grouped_gemm.TAIL_MIN_BLOCK_M`` rows or more, an expert's
    last block holding at most block_m / 2 slots runs a half-height tile, and with ``tail_div`` 4
    one holding at most block_m / 4 a quarter-height one (2 or 4; no effect on smaller blocks).

    ``fold_m``: an expert's last block holding at most ``fold_m`` slots (16, 32 or 64; 0 = off) is
    computed by the program of the expert's block before it, from the same weight tiles, instead
    of a program of its own. Only where fold_m < block_m and this GEMM's block_m is the alignment
    (the larger block_m of the two GEMMs); otherwise no effect.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tail_div: int = 2
    fold_m: int = 0

    def __post_init__(self):
        if self.tail_div not in TAIL_DIVS:
            raise ValueError(f"tail_div must be one of {TAIL_DIVS} (got {self.tail_div})")
        if self.fold_m not in FOLD_MS:
            raise ValueError(f"fold_m must be one of {FOLD_MS} (got {self.fold_m})")


@dataclass(frozen=True)
class MoeConfig:
    """Configs of the up and down GEMMs of one call.

    The slots are aligned to the larger of the two block_m; the GEMM with the smaller block_m runs
    several row blocks per aligned block and skips those that hold only padding.
    """

    up: GemmConfig
    down: GemmConfig

    @property
    def block_m(self) -> int:
        return max(self.up.block_m, self.down.block_m)


@functools.lru_cache(maxsize=4096)
def default_config(
    M_tokens: int, H: int, F: int, E: int, K: int, dtype=torch.bfloat16, weights: str = "dense"
) -> MoeConfig:
    """Pick tiles from the shape and the token count.

    The rows an expert sees on average, T*K/E, decide the regime: a few rows per expert is a
    weight-streaming (memory-bound) problem, where a small BLOCK_M wastes no padding and a long
    BLOCK_K keeps many weight bytes in flight; hundreds of rows per expert is compute-bound, where
    large tiles and deep pipelines feed the tensor cores. The tiles are the winners of a sweep on
    an H100 (bench/moe_kernels.py --sweep, 2026-11-23) over Mixtral, Qwen3-30B-A3B, OLMoE and
    DeepSeek-V3 shapes; within a regime the best candidates were within a few percent of each other.
    Re-checked on an H200 (2026-12-01) against the H200 tuning tables' winners, on all four shapes
    at a token count inside each regime: the <= 8 and 33-64 rows regimes took those winners then
    (1.02x and 1.10x geomean, never slower on any shape), and the compute-bound up GEMM a 4-stage
    ring (2-7% faster than 3 stages on every shape).

    A block height should stay above ~4/3 of the mean rows per expert (H200, 2026-12-02,
    bench/RESULTS.md): at a mean near the block height about half the experts hold a few rows more
    than one block and run a second, almost empty block that streams their weights again. So from
    24 rows per expert 64-row blocks replace 32-row ones (at ~32 rows: 1.07-1.12x on all four
    shapes; at ~24 rows 0.95-0.97x), and from 48 rows 128-row blocks (whose 64-row tail tile takes
    an expert with <= 64 rows) replace 64-row ones (at ~64 rows: Mixtral T=256 1.10x, OLMoE T=512
    1.09x, Qwen3 T=1024 1.07x, DeepSeek-V3 T=2048 1.11x; at ~40 rows 0.98-1.01x). group_m 1 was
    at least as fast as 8 for the 64-row blocks in all twelve cells measured. Measured for bf16
    weights only: quantised weights keep the earlier regimes (32-row blocks up to 32 rows, 64-row
    ones up to 64).

    Quarter-height tail tiles (``tail_div`` 4) are used where many experts have large weights (at
    least 64 experts, H·F >= 8M): each expert's last block, when nearly empty, still streams the
    expert's weights, and a shorter tile makes that block cheaper. Measured on an H200 (2026-12-02,
    bench/kernel_switches.py, medians of alternating rounds, two runs): DeepSeek-V3 1.03-1.04x at
    T=4096 and 1.01-1.02x at T=16384; Mixtral-8x7B (8 experts), OLMoE and Qwen3 (small experts)
    0.99-1.00x.

    Folded tails (``fold_m`` 32: an expert's last block of at most 32 slots computed by the
    program of its full block before it) are used in the same regime, for dense weights: the
    expert's weights then stream once. Measured on an H200 (2026-12-02, bench/kernel_switches.py
    and a fold-height A/B, rounds in turn, three runs): DeepSeek-V3 1.07-1.13x at T=4096 and
    0.99-1.03x at T=16384 (where a quarter of the experts end in a foldable block); Mixtral-8x7B,
    OLMoE and Qwen3 0.96-1.01x, where the longer programs cost more than the weights they save.

    ``weights`` ("dense", "int8", "int4", "fp8": how the expert weights are stored) keeps the
    earlier tiles where the H200 tiles measured slower for that format (bench/moe_quant.py,
    2026-12-01): fp8 at <= 8 rows (Mixtral T=16 0.473 vs 0.592 ms, Qwen3 0.161 vs 0.175 ms) and
    int4 at <= 64 rows (Mixtral T=256 0.960 vs 1.080 ms).
    """
    rows = M_tokens * K / max(E, 1)
    if rows <= 8 and weights == "fp8":
        up, down = GemmConfig(16, 32, 256, 1, 4, 4), GemmConfig(16, 64, 256, 1, 4, 3)
    elif rows <= 8:
        up, down = GemmConfig(16, 64, 256, 1, 4, 4), GemmConfig(16, 64, 128, 1, 4, 3)
    elif rows <= 24 or (rows <= 32 and weights != "dense"):
        up, down = GemmConfig(32, 128, 128, 8, 4, 3), GemmConfig(32, 128, 128, 8, 4, 3)
    elif rows <= 64 and weights == "int4":
        up, down = GemmConfig(64, 64, 128, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 4)
    elif rows <= 64 and weights != "dense":
        up, down = GemmConfig(64, 128, 64, 8, 4, 4), GemmConfig(64, 128, 64, 8, 4, 3)
    elif rows <= 48:
        up, down = GemmConfig(64, 128, 64, 1, 4, 4), GemmConfig(64, 128, 64, 1, 4, 3)
    else:
        many_large = E >= 64 and H * F >= 8 << 20
        tail_div = 4 if many_large else 2
        fold_m = 32 if many_large and weights == "dense" else 0
        up = GemmConfig(128, 128, 64, 8, 8, 4, tail_div, fold_m)
        down = GemmConfig(128, 256, 64, 8, 8, 4, tail_div, fold_m)
    if dtype == torch.float32:  # 4-byte tiles: keep the shared-memory ring within 227 KB
        up, down = (replace(c, block_k=min(c.block_k, 32), num_stages=2) for c in (up, down))
    return MoeConfig(_fit(up, H, F), _fit(down, F, H))


def _fit(c: GemmConfig, reduce_dim: int, out_dim: int) -> GemmConfig:
    """Shrink block_k / block_n to the problem (no tile wider than the next power of two)."""
    bk = max(16, min(c.block_k, next_power_of_2(reduce_dim)))
    bn = max(16, min(c.block_n, next_power_of_2(out_dim)))
    return replace(c, block_n=bn, block_k=bk)


def pick_config(
    M_tokens: int,
    H: int,
    F: int,
    E: int,
    K: int,
    dtype: torch.dtype,
    table: dict | None = None,
    weights: str = "dense",
) -> MoeConfig:
    """The config for a call: from ``table`` when given, else ``default_config``.

    ``table`` maps a token-count bucket to a ``MoeConfig`` (or a dict ``{"up": {...}, "down":
    {...}}`` of GemmConfig fields); the entry with the largest bucket <= M_tokens is used (the
    smallest bucket when M_tokens is below all of them).
    """
    if not table:
        return default_config(M_tokens, H, F, E, K, dtype, weights)
    buckets = sorted(table)
    below = [b for b in buckets if b <= M_tokens]
    c = table[below[-1] if below else buckets[0]]
    if isinstance(c, dict):
        c = MoeConfig(GemmConfig(**c["up"]), GemmConfig(**c["down"]))
    return c
