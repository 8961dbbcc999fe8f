"""Safe YAML loading that remembers where every value came from.

The loader accepts plain YAML data only: no tags (``!!python/...``), no anchors or aliases (which also rules
out alias bombs), no duplicate keys, and a bounded file size. Alongside the data it returns a ``SourceMap``
from field paths (tuples of keys and list indices) to (line, column), so that validation errors can point
at the YAML text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moec.errors import Diagnostic, SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; 1 MiB is generous and bounds the parser's work

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class SourceMap:
    """Where each field path of a loaded document sits in its file (1-based line and column), and
    the words YAML read as booleans (``no``, ``on``), so a message can say how to quote them."""

    file: str
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    booleans: dict[Path_, str] = field(default_factory=dict)

    def locate(self, path: Path_) -> tuple[int, int]:
        """The position of ``path``, or of its nearest ancestor that has one."""
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.positions:
                return self.positions[path[:cut]]
        return (1, 1)

    def diagnostic(self, path: Path_, message: str, hint: str | None = None) -> Diagnostic:
        line, col = self.locate(path)
        return Diagnostic(format_path(path), message, self.file, line, col, hint)


def format_path(path: Path_) -> str:
    """("experts", 1, "ffn") -> "experts[1].ffn"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def parse_path(text: str) -> Path_:
    """ "experts[1].ffn" -> ("experts", 1, "ffn") (the inverse of ``format_path``)."""
    return tuple(
        int(index) if index else key for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text)
    )


def load_text(text: str, file: str = "<spec>") -> tuple[Any, SourceMap]:
    """Parse YAML text into plain Python data plus its source map; raise ``SpecError`` on bad YAML."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError([Diagnostic("", f"file is larger than {MAX_SPEC_BYTES} bytes", file)])
    try:
        _reject_anchors(text, file)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([Diagnostic("", f"invalid YAML: {problem}", file, line, col)]) from None
    source = SourceMap(file)
    errors: list[Diagnostic] = []
    data = _to_python(node, (), source, errors) if node is not None else None
    if errors:
        raise SpecError(errors)
    return data, source


def load_file(path: str | Path) -> tuple[Any, SourceMap]:
    """Read and parse a spec file; the file name in diagnostics is the path as given."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                [Diagnostic("", f"file is larger than {MAX_SPEC_BYTES} bytes", str(path))]
            )
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Diagnostic("", f"cannot read spec: {exc}", str(path))]) from None
    return load_text(text, str(path))


def _to_python(node, path: Path_, source: SourceMap, errors: list[Diagnostic]) -> Any:
    positions, file = source.positions, source.file
    positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)

    def fail(message: str, where=node) -> None:
        mark = where.start_mark
        errors.append(Diagnostic(_fmt(path), message, file, mark.line + 1, mark.column + 1))

    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _COLLECTION_TAGS:
        fail(f"YAML tags are not allowed in a spec (got {node.tag})")
        return None
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                fail("mapping keys must be plain strings (no merge keys)", key_node)
                continue
            key = str(key_node.value)
            if key in out:
                mark = key_node.start_mark
                errors.append(
                    Diagnostic(
                        _fmt(path + (key,)), "duplicate key", file, mark.line + 1, mark.column + 1
                    )
                )
                continue
            out[key] = _to_python(value_node, path + (key,), source, errors)
            # Point errors about a field at its key, where a reader looks first.
            positions[path + (key,)] = (
                key_node.start_mark.line + 1,
                key_node.start_mark.column + 1,
            )
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path + (i,), source, errors) for i, v in enumerate(node.value)]
    if node.tag in _PLAIN_TAGS:
        value = _scalar(node)
        if isinstance(value, bool):
            source.booleans[path] = node.value
        return value
    fail(f"YAML tags are not allowed in a spec (got {node.tag})")
    return None


_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")} | {"!"}
# PyYAML follows YAML 1.1, where "1e-5" (no dot) is a string; a spec author means a number.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _reject_anchors(text: str, file: str) -> None:
    """Anchors and aliases make specs hard to read and allow exponential blow-up: refuse them."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            message = "YAML anchors and aliases are not allowed in a spec"
            raise SpecError([Diagnostic("", message, file, mark.line + 1, mark.column + 1)])


def _scalar(node) -> Any:
    """Construct one scalar with the safe constructors (ints, floats, bools, null, strings)."""
    if node.style is None and node.tag.endswith(":str") and _SCIENTIFIC.match(node.value):
        return float(node.value)
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _fmt(path: Path_) -> str:
    return format_path(path)
