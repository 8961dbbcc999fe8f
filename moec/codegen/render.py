"""Render a plan into the files of a generated package, in memory.

One template per emitted file. Python output is formatted with black and must parse; shell output must
pass ``bash -n`` where bash exists. The result is ``{relative path: bytes}`` in a fixed order, so the same
spec gives the same bytes on any machine.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import black
import jinja2

from moec.codegen.report import plan_markdown
from moec.codegen.views import package_context
from moec.plan.ir import Plan
from moec.spec import Spec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# The Triton kernel library: plain Python, copied into every package as kernels/ (with a header).
KERNELS = TEMPLATES / "kernels_src" / "moe_kernels"
BLACK_MODE = black.Mode(line_length=100, target_versions={black.TargetVersion.PY310})

# generated path -> (template under templates/, the context flag that says the spec needs the file)
PACKAGE_FILES = {
    "__init__.py": ("torch/__init__.py.jinja", None),
    "layer.py": ("torch/layer.py.jinja", None),
    "router.py": ("torch/router.py.jinja", None),
    "experts.py": ("torch/experts.py.jinja", None),
    "dispatch.py": ("torch/dispatch.py.jinja", None),
    "quant.py": ("torch/quant.py.jinja", "any_quantized"),
    "comm.py": ("torch/comm.py.jinja", "distributed"),
    "weights.py": ("torch/weights.py.jinja", None),
    "backend.py": ("torch/backend.py.jinja", None),
    "tuning.py": ("torch/tuning.py.jinja", None),
    "graphs.py": ("torch/graphs.py.jinja", None),
    "launch/__init__.py": ("torch/launch/__init__.py.jinja", None),
    "launch/run.py": ("torch/launch/run.py.jinja", None),
    "launch/torchrun.sh": ("torch/launch/torchrun.sh.jinja", None),
    "launch/slurm.sbatch": ("torch/launch/slurm.sbatch.jinja", None),
}


@dataclass(frozen=True)
class Origin:
    """What the header of each generated file says about where it came from."""

    spec_path: str  # as the user should type it: relative, forward slashes
    command: str  # the command that regenerates the package

    def __post_init__(self):
        # These land in comments of generated code: escape newlines and anything unprintable, so a
        # file name can never start a line of code.
        for name in ("spec_path", "command"):
            value = getattr(self, name)
            if not value.isprintable():
                object.__setattr__(self, name, value.encode("unicode_escape").decode("ascii"))


class RenderError(RuntimeError):
    """A template produced invalid code: a moec bug."""


def _cache_dir() -> Path | None:
    if os.environ.get("MOEC_NO_CACHE"):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moec" / f"black-{black.__version__}"


def format_python(text: str) -> str:
    """black, memoised on disk by the sha256 of the input: black is most of a build's time
    (~60 ms a file), and most rebuilds render the same text again. Set MOEC_NO_CACHE=1 to bypass."""
    cache = _cache_dir()
    entry = cache / hashlib.sha256(text.encode()).hexdigest() if cache else None
    if entry is not None and entry.is_file():
        return entry.read_text()
    formatted = black.format_str(text, mode=BLACK_MODE)
    if entry is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(formatted)
            os.replace(tmp, entry)
        except OSError:  # a read-only home is fine: just slower
            pass
    return formatted


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render_package(spec: Spec, plan: Plan, origin: Origin) -> dict[str, bytes]:
    """Every file of the generated package, formatted, keyed by path relative to the package root."""
    context = package_context(spec, plan)
    files: dict[str, bytes] = {}
    for path, (template, needed_if) in PACKAGE_FILES.items():
        if needed_if is not None and not context[needed_if]:
            continue
        file = _header_info(context, plan, origin, template)
        text = environment().get_template(template).render(**context, file=file)
        files[path] = _finish(path, text, template).encode()
    for source in sorted(KERNELS.glob("*.py")):
        template = f"kernels_src/moe_kernels/{source.name}"
        text = (
            environment()
            .get_template("kernels/_copy.py.jinja")
            .render(file=_header_info(context, plan, origin, template), source=source.read_text())
        )
        # the kernel sources are kept black-formatted in the repo (checked by the tests): no need to
        # format them again for every build
        files[f"kernels/{source.name}"] = text.encode()
    files["plan.json"] = plan.to_json().encode()
    files["PLAN.md"] = plan_markdown(spec, plan, origin).encode()
    return dict(sorted(files.items()))


def _header_info(context: dict, plan: Plan, origin: Origin, template: str) -> dict:
    return {
        "version": context["version"],
        "spec_path": origin.spec_path,
        "spec_hash": plan.spec_hash,
        "template": template,
        "command": origin.command,
    }


def _finish(path: str, text: str, template: str) -> str:
    if path.endswith(".py"):
        try:
            text = format_python(text)
            ast.parse(text)
        except (black.InvalidInput, SyntaxError) as exc:
            raise RenderError(f"template {template} produced invalid Python: {exc}") from None
    elif path.endswith((".sh", ".sbatch")) and shutil.which("bash"):
        result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        if result.returncode:
            raise RenderError(f"template {template} produced invalid shell: {result.stderr}")
    return text
