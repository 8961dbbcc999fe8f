"""The planner: a fixed, named list of pure passes, with an invariant check after each.

    canonicalize → place_experts → schedule_comm → plan_memory → choose_kernels → estimate_cost

Each pass takes the spec and the plan so far and returns a new plan; none touches the disk or mutates its
input. ``run_passes`` checks the invariants after every pass, so a broken pass fails at its own name.

This module holds the list (``PASSES``), the invariants and ``run_passes``; the passes live by what
they plan: ``canonical`` (canonicalize), ``residency`` (place_experts, plan_memory), ``schedule``
(schedule_comm, estimate_cost) and ``kernel_choice`` (choose_kernels), all in ``moec.plan``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from moec.plan.canonical import canonicalize
from moec.plan.ir import Plan
from moec.plan.kernel_choice import choose_kernels
from moec.plan.residency import place_experts, plan_memory
from moec.plan.schedule import estimate_cost, schedule_comm
from moec.spec import Spec

Pass = Callable[[Spec, Plan | None, Path | None], Plan]
PASSES: tuple[Pass, ...] = (
    canonicalize,
    place_experts,
    schedule_comm,
    plan_memory,
    choose_kernels,
    estimate_cost,
)


class PlanInvariantError(AssertionError):
    """A pass produced a plan that breaks an invariant: a moec bug, not a user error."""


def check_invariants(spec: Spec, plan: Plan) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PlanInvariantError(what)

    need(sum(g.count for g in plan.groups) == plan.dims.experts, "groups cover every expert once")
    firsts = [sum(h.count for h in plan.groups[:i]) for i in range(len(plan.groups))]
    need([g.first for g in plan.groups] == firsts, "groups are contiguous, in spec order")
    need(plan.mesh.world == plan.mesh.dp * plan.mesh.tp * plan.mesh.pp, "mesh world = dp*tp*pp")
    if plan.placement is not None:
        need(len(plan.placement.layers) == len(plan.moe_layers), "one placement per MoE layer")
        for layer in plan.placement.layers:
            need(len(layer.ranks) == plan.mesh.ep, "one expert list per ep rank")
            placed = {e for ids in layer.ranks for e in ids}
            need(placed == set(range(plan.dims.experts)), "every expert placed")
            slots = sum(len(ids) for ids in layer.ranks)
            need(
                slots == plan.dims.experts + spec.placement.redundant, "slots = experts + redundant"
            )
            share_E = [0.0] * plan.dims.experts
            for ids, shares in zip(layer.ranks, layer.shares, strict=True):
                for e, share in zip(ids, shares, strict=True):
                    share_E[e] += share
            need(
                all(abs(x - 1.0) < 1e-4 for x in share_E),
                "each expert's copies serve all its tokens",
            )
            need(
                all(len(set(ids)) == len(ids) for ids in layer.ranks),
                "no duplicate expert on a rank",
            )
    if plan.memory is not None:
        parts = plan.memory.token_buffers + plan.memory.activations
        need(plan.memory.total >= parts, "memory total covers its parts")
    if plan.cost is not None:
        need(all(us >= 0 for us in plan.cost.phases_us.values()), "phase times are non-negative")


def run_passes(
    spec: Spec, base_dir: Path | None = None, trace: Callable[[str, Plan], None] | None = None
) -> Plan:
    """Run every pass in order, checking invariants after each; ``trace`` sees each intermediate plan.

    ``base_dir`` is the spec file's folder: ``placement.trace`` is relative to it.
    """
    plan: Plan | None = None
    for step in PASSES:
        plan = step(spec, plan, base_dir)
        try:
            check_invariants(spec, plan)
        except PlanInvariantError as exc:
            raise PlanInvariantError(f"after pass {step.__name__}: {exc}") from None
        if trace is not None:
            trace(step.__name__, plan)
    return plan
