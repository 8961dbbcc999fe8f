"""Triton kernels for one MoE layer: fused routing, expert alignment, grouped GEMMs with the GLU
and routing weight fused, and their ``torch.library`` ops.

Layers: ``routing`` / ``permute`` / ``grouped_gemm`` (with ``epilogue``) / ``combine`` (Triton
kernels and launchers, which launch through ``launch``) → ``ops`` (custom ops with autograd; the
public API) — with ``reference`` (plain-torch oracles) beside them.

Shape legend: T tokens, H hidden, F expert width, E experts, K top-k, N = T*K slots.
"""

from .configs import GemmConfig, MoeConfig, default_config, pick_config
from .ops import moe_experts, moe_experts_triton, moe_routing, records_autograd, register_configs
from .permute import align_by_expert

__all__ = [
    "GemmConfig",
    "MoeConfig",
    "align_by_expert",
    "default_config",
    "moe_experts",
    "moe_experts_triton",
    "moe_routing",
    "pick_config",
    "records_autograd",
    "register_configs",
]
