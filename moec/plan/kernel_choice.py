"""The ``choose_kernels`` pass: which parts run as Triton kernels, and the tuned tile tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moec.plan import tuning as tuning_mod
from moec.plan.ir import KernelPlan, Plan
from moec.spec import Spec


def routing_kernel_covers(spec: Spec) -> bool:
    """Whether the fused routing kernel computes exactly this router's selection and weights.

    The kernel adds the selection bias to whatever it ranks (scores, or logits with topk_on
    logits); a bias on the logits while ranking scores, zero experts, and the non-top-k routers stay
    on the torch path.
    """
    r = spec.router
    bias_ok = r.selection_bias == "none" or (r.selection_bias == "scores") == (
        r.topk_on == "scores"
    )
    return r.kind == "token_choice" and spec.zero_experts == 0 and bias_ok


def choose_kernels(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Which parts run as Triton kernels on CUDA, and the tile tables from ``moec tune`` if given."""
    groups = tuple(g.name for g in plan.groups)  # every precision: float, int8, int4, fp8 tiles
    notes = []
    if not routing_kernel_covers(spec):
        notes.append("this router runs the torch path (the routing kernel does not cover it)")
    tuning, source = (), None
    if spec.kernels.tuning is not None:
        source = spec.kernels.tuning
        tuning = tuning_mod.load_tuning((base_dir or Path(".")) / source)
    plan_kernels = KernelPlan(routing_kernel_covers(spec), groups, source, tuning, tuple(notes))
    return dataclasses.replace(plan, kernels=plan_kernels)
