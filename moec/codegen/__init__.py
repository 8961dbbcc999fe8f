"""Code generation: Plan → template contexts → files (in memory) → disk (``writer``)."""

from __future__ import annotations

import os
from pathlib import Path

from moec.codegen.render import Origin, render_package
from moec.plan import run_passes
from moec.spec import Spec, load_spec


def header_root(spec_path: Path | str) -> Path:
    """The folder generated headers show paths relative to: the git work tree holding the spec
    (the repository root, where CI runs ``moec build --check``), else the spec's own folder. Not
    the working directory, so that a package's bytes do not depend on where moec ran."""
    spec_dir = Path(spec_path).resolve().parent
    for folder in (spec_dir, *spec_dir.parents):
        if (folder / ".git").exists():  # a folder, or a file in worktrees and submodules
            return folder
    return spec_dir


def display_path(path: Path | str, root: Path | str | None = None) -> str:
    """A path as generated headers show it: relative to ``root`` (default: the working
    directory), forward slashes."""
    path = Path(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path(root or Path.cwd()).resolve())).as_posix()
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
    root = header_root(spec_path)
    shown = display_path(spec_path, root)
    origin = Origin(shown, f"moec build {shown} -o {display_path(out, root)}")
    return spec, out, generate(spec, origin, Path(spec_path).parent)


__all__ = ["Origin", "build_files", "display_path", "generate", "header_root"]
