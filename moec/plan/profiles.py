"""Accelerator profiles for the cost model.

Numbers are *achievable* rates, not datasheet peaks, where a measurement exists: the H100 figures are the
ceilings measured on this project's lent machine (BENCH.md: bf16 GEMM 8192³ ≈ 764 TFLOP/s, device copy
≈ 3.02 TB/s). The others scale datasheet peaks by the same ≈77% (compute) and ≈90% (memory) ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.spec.schema import GpuProfile


@dataclass(frozen=True)
class Gpu:
    name: str
    tflops_bf16: float  # dense bf16 matrix rate, TFLOP/s
    hbm_gbps: float  # device memory bandwidth, GB/s (bytes read + written)
    memory_gb: float


PROFILES = {
    "h100": Gpu("h100", 764.0, 3020.0, 80.0),
    "h200": Gpu("h200", 764.0, 4300.0, 141.0),  # same compute as H100; 4.8 TB/s datasheet × 0.9
    "a100": Gpu("a100", 240.0, 1800.0, 80.0),  # 312 TFLOP/s, 2.0 TB/s datasheet
    "b200": Gpu("b200", 1730.0, 7200.0, 180.0),  # 2250 TFLOP/s, 8 TB/s datasheet
    "cpu": Gpu("cpu", 1.0, 100.0, 64.0),  # a rough server CPU socket, for plans of CPU test runs
}


def gpu(profile: str | GpuProfile) -> Gpu:
    """The named profile, or an explicit one from the spec."""
    if isinstance(profile, str):
        return PROFILES[profile]
    return Gpu(profile.name, profile.tflops_bf16, profile.hbm_gbps, profile.memory_gb)
