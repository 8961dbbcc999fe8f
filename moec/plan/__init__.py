"""Planning: spec → Plan through named pure passes (see ``moec.plan.passes``)."""

from moec.plan.ir import Plan
from moec.plan.passes import PASSES, run_passes

__all__ = ["PASSES", "Plan", "run_passes"]
