"""The ``choose_kernels`` pass: which parts run as Triton kernels, and the tuned tile tables."""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path

from moec.errors import FieldError, UsageError
from moec.plan import tuning as tuning_mod
from moec.plan.ir import KernelPlan, Plan
from moec.spec import Spec

DENSE = ("bf16", "fp16", "fp32")  # group dtypes whose weights are stored in the activations' dtype


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


def kernel_shapes(plan: Plan) -> tuple[tuple[str, int, int, int, int, str], ...]:
    """(group, H, F, E, K, weights) of every distinct expert-kernel call on some rank: E is what a
    rank holds of the group in some layer (all of it on one GPU), F its expert-tp slice, weights
    "dense" or the group's weight-only format."""
    H, K = plan.dims.expert_in, plan.dims.slots
    layers = plan.placement.layers if plan.placement and plan.placement.layers else ()
    out = []
    for g in plan.groups:
        lo, hi = g.first, g.first + g.count
        held = {
            bisect.bisect_left(r, hi) - bisect.bisect_left(r, lo) for p in layers for r in p.ranks
        }
        weights = "dense" if g.dtype in DENSE else g.dtype
        F = g.ffn // plan.mesh.expert_tp
        out += [(g.name, H, F, E, K, weights) for E in sorted((held or {g.count}) - {0})]
    return tuple(out)


def _tuning_notes(spec: Spec, path: Path, tuning, shapes) -> list[str]:
    """What a user should know about a tuning table: shapes it has no tiles for (they run the
    heuristic), and a table measured on another GPU than the cluster's."""
    notes = []
    tuned = {shape for shape, _ in tuning}
    for name, *shape in shapes:
        if tuple(shape) not in tuned:
            notes.append(
                f"kernels.tuning has no tiles for group {name!r} (H, F, E, K, weights) = "
                f"{tuple(shape)}: it runs the heuristic tiles (run `moec tune` on this spec)"
            )
    gpu, measured_on = spec.cluster.gpu, tuning_mod.tuning_gpu(path)
    if isinstance(gpu, str) and gpu != "cpu" and measured_on and gpu not in measured_on.lower():
        notes.append(
            f"kernels.tuning was measured on {measured_on}, the cluster has {gpu}: the tiles may "
            f"not be the best there (run `moec tune` on a {gpu})"
        )
    return notes


def choose_kernels(spec: Spec, plan: Plan, base_dir: Path | None = None) -> Plan:
    """Which parts run as Triton kernels on CUDA, and the tile tables from ``moec tune`` if given."""
    groups = tuple(g.name for g in plan.groups)  # every precision: float, int8, int4, fp8 tiles
    shapes = kernel_shapes(plan)
    notes = []
    if not routing_kernel_covers(spec):
        notes.append("this router runs the torch path (the routing kernel does not cover it)")
    tuning, source = (), None
    if spec.kernels.tuning is not None:
        source = spec.kernels.tuning
        path = (base_dir or Path(".")) / source
        try:
            tuning = tuning_mod.load_tuning(path)
        except UsageError as exc:
            raise FieldError("kernels.tuning", str(exc)) from None
        notes += _tuning_notes(spec, path, tuning, shapes)
    plan_kernels = KernelPlan(
        routing_kernel_covers(spec), groups, source, tuning, shapes, tuple(notes)
    )
    return dataclasses.replace(plan, kernels=plan_kernels)
