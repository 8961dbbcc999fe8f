"""Render a plan into the files of a generated package, in memory.

One template per emitted file. Python output is formatted with black and must parse; shell output must
pass ``bash -n`` where bash exists. The result is ``{relative path: bytes}`` in a fixed order, so the same
spec gives the same bytes on any machine.
"""

from __future__ import annotations

import ast
import functools
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
BLACK_MODE = black.Mode(line_length=100, target_versions={black.TargetVersion.PY310})

# generated path -> template path (under templates/); None = only when the spec needs it
PACKAGE_FILES = {
    "__init__.py": "torch/__init__.py.jinja",
    "layer.py": "torch/layer.py.jinja",
    "router.py": "torch/router.py.jinja",
    "experts.py": "torch/experts.py.jinja",
    "dispatch.py": "torch/dispatch.py.jinja",
    "quant.py": "torch/quant.py.jinja",
    "weights.py": "torch/weights.py.jinja",
    "launch/__init__.py": "torch/launch/__init__.py.jinja",
    "launch/run.py": "torch/launch/run.py.jinja",
}


@dataclass(frozen=True)
class Origin:
    """What the header of each generated file says about where it came from."""

    spec_path: str  # as the user should type it: relative, forward slashes
    command: str  # the command that regenerates the package


class RenderError(RuntimeError):
    """A template produced invalid code: a moec bug."""


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
    for path, template in PACKAGE_FILES.items():
        if path == "quant.py" and not context["any_quantized"]:
            continue
        file = {
            "version": context["version"],
            "spec_path": origin.spec_path,
            "spec_hash": plan.spec_hash,
            "template": template,
            "command": origin.command,
        }
        text = environment().get_template(template).render(**context, file=file)
        files[path] = _finish(path, text, template).encode()
    files["plan.json"] = plan.to_json().encode()
    files["PLAN.md"] = plan_markdown(spec, plan, origin).encode()
    return dict(sorted(files.items()))


def _finish(path: str, text: str, template: str) -> str:
    if path.endswith(".py"):
        try:
            text = black.format_str(text, mode=BLACK_MODE)
            ast.parse(text)
        except (black.InvalidInput, SyntaxError) as exc:
            raise RenderError(f"template {template} produced invalid Python: {exc}") from None
    elif path.endswith(".sh") and shutil.which("bash"):
        result = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        if result.returncode:
            raise RenderError(f"template {template} produced invalid shell: {result.stderr}")
    return text
