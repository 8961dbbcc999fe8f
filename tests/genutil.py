"""Build a spec's package in memory, write it to a temporary folder, and import it under a unique name."""

from __future__ import annotations

import importlib
import itertools
import sys
import tempfile
from pathlib import Path

from moec.codegen import generate
from moec.spec import Spec, load_spec_text

_counter = itertools.count()
_root = Path(tempfile.mkdtemp(prefix="moec-genutil-"))


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    for rel, data in files.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def build_package(spec: Spec | str, tmp_path: Path | None = None):
    """Generate ``spec`` (a Spec or YAML text) and import the package; returns the module."""
    if isinstance(spec, str):
        spec = load_spec_text(spec)[0]
    root = Path(tmp_path) if tmp_path is not None else _root
    name = f"{spec.name}_{next(_counter)}"
    write_files(generate(spec), root / name)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    return importlib.import_module(name)
