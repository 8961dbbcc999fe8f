"""Planning: spec → Plan through named pure passes (see ``moec.plan.passes``)."""

from __future__ import annotations

from pathlib import Path

from moec.plan.ir import Plan
from moec.plan.passes import PASSES, run_passes
from moec.spec import Spec, load_spec, located_in

__all__ = ["PASSES", "Plan", "plan_file", "run_passes"]


def plan_file(path: str | Path) -> tuple[Spec, Plan]:
    """Load, validate and plan a spec file: every mistake ``moec build`` would report, the
    planner's too (a missing trace, experts that do not fit), as a ``SpecError`` at its YAML line.
    """
    spec, _ = load_spec(path)
    with located_in(path):
        return spec, run_passes(spec, Path(path).parent)
