"""Code generation: Plan → template contexts → files (in memory) → disk (``writer``)."""

from __future__ import annotations

from moec.codegen.render import Origin, render_package
from moec.plan import run_passes
from moec.spec import Spec


def generate(spec: Spec, origin: Origin | None = None) -> dict[str, bytes]:
    """Plan ``spec`` and render its package: ``{relative path: bytes}``."""
    origin = origin or Origin(
        spec_path=f"<{spec.name}>", command=f"moec build <spec> -o generated/{spec.name}"
    )
    return render_package(spec, run_passes(spec), origin)


__all__ = ["Origin", "generate"]
