"""Code generation: Plan → template contexts → files (in memory) → disk (``writer``)."""

from __future__ import annotations

import os
from pathlib import Path

from moec.codegen.render import Origin, render_package
from moec.plan import run_passes
from moec.spec import Spec, load_spec


def display_path(path: Path | str) -> str:
    """A path as generated headers show it: relative to the working directory, forward slashes."""
    path = Path(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd())).as_posix()
    except ValueError:  # another drive (Windows)
        return path.name


def generate(
    spec: Spec, origin: Origin | None = None, base_dir: Path | None = None
) -> dict[str, bytes]:
    """Plan ``spec`` and render its package: ``{relative path: bytes}``.

    ``base_dir``: the spec file's folder (a ``placement.trace`` path is relative to it)."""
    origin = origin or Origin(
        spec_path=f"<{spec.name}>", command=f"moec build <spec> -o generated/{spec.name}"
    )
    return render_package(spec, run_passes(spec, base_dir), origin)


def build_files(
    spec_path: Path | str, out: Path | str | None = None, out_dir: Path | str = "generated"
) -> tuple[Spec, Path, dict[str, bytes]]:
    """Load a spec file and render its package as ``moec build SPEC [-o OUT]`` would write it
    (to ``out``, or ``out_dir/<name>``)."""
    spec, _ = load_spec(spec_path)
    out = Path(out) if out is not None else Path(out_dir) / spec.name
    origin = Origin(
        display_path(spec_path), f"moec build {display_path(spec_path)} -o {display_path(out)}"
    )
    return spec, out, generate(spec, origin, Path(spec_path).parent)


__all__ = ["Origin", "build_files", "display_path", "generate"]
