"""Errors that reach the user, and the exit codes of the command line.

A user mistake is a ``SpecError``: it carries one or more ``Diagnostic`` records, each pointing at a YAML
file, line and column and naming the field path, and prints without a traceback:

    specs/x.yaml:5:24: error: router.top_k: switch routing is top-1 (got 2)
      hint: set top_k: 1

A spec that parses but cannot be planned (a trace file that is missing, experts that do not fit the
GPU) raises a ``FieldError`` naming the field; ``moec.spec.located_in`` points it at the YAML. A
package that cannot be written raises a ``WriteError`` naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_WOULD_CHANGE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 123


@dataclass(frozen=True)
class Diagnostic:
    """One problem with a spec: where it is, which field, what is wrong, what to do."""

    path: str  # dotted field path, e.g. "router.groups.keep"
    message: str
    file: str = "<spec>"
    line: int = 0  # 1-based; 0 when unknown
    col: int = 0
    hint: str | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        field = f"{self.path}: " if self.path else ""
        text = f"{where}: error: {field}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class MoecError(Exception):
    """Base class of every error moec reports to a user (exit code 2)."""

    exit_code = EXIT_USAGE

    def render(self) -> str:
        return f"error: {self}"


class SpecError(MoecError):
    """A spec that cannot be accepted; holds every diagnostic found, in file order."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.file, d.line, d.col, d.path))
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    def render(self) -> str:
        return str(self)


class UsageError(MoecError):
    """A bad command line or input file that is not a spec (a trace, an HF config)."""


class FieldError(MoecError):
    """A spec that parses but cannot be planned; ``path`` names the spec field to change
    (``placement.trace``, ``cluster.gpu.memory_gb``)."""

    def __init__(self, path: str, message: str, hint: str | None = None):
        self.path, self.message, self.hint = path, message, hint
        super().__init__(f"{path}: {message}" + (f"\n  hint: {hint}" if hint else ""))


class WriteConflict(MoecError):
    """The writer refused to overwrite hand-edited or foreign files (a line each: ``conflicts``)."""

    hint = "move your edits into the spec, or pass --force to overwrite"

    def __init__(self, conflicts: list[str]):
        self.conflicts = conflicts
        super().__init__(self.text("refusing to overwrite"))

    def text(self, head: str) -> str:
        """The conflicts under ``head`` ("refusing to overwrite", or --check's "would refuse ...")."""
        return f"{head}:\n  " + "\n  ".join(self.conflicts) + f"\n  hint: {self.hint}"


class WriteError(MoecError):
    """The operating system refused a write (permissions, a file where a folder should be, ...)."""

    def __init__(self, path, reason: str, action: str = "write"):
        self.path = path
        super().__init__(f"cannot {action} {path}: {reason}")
