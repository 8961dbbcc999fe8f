"""Load, validate and fingerprint MoE specs."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moec.errors import FieldError, SpecError
from moec.spec.checks import problems
from moec.spec.loader import SourceMap, load_file, load_text, parse_path
from moec.spec.schema import Spec

__all__ = [
    "Spec",
    "SourceMap",
    "load_spec",
    "located_in",
    "parse_spec",
    "spec_hash",
    "spec_to_data",
]


def parse_spec(data: Any, source: SourceMap) -> Spec:
    """Validate plain data (from YAML) into a ``Spec``; raise ``SpecError`` with located diagnostics."""
    if not isinstance(data, dict):
        raise SpecError([source.diagnostic((), "a spec must be a YAML mapping")])
    try:
        spec = Spec.model_validate(_tuples(data))
    except ValidationError as exc:
        grouped: dict[tuple, list[dict]] = {}
        for err in exc.errors():  # a union reports once per member: one diagnostic per field
            grouped.setdefault(_real_path(err, data), []).append(err)
        diagnostics = {}
        for errs in grouped.values():
            diag = _diagnostic(errs, source, data)
            diagnostics[diag.path] = diag
        # A bad item also makes its list fail as a whole; report only the innermost problems.
        paths = list(diagnostics)
        inner = [
            d
            for p, d in diagnostics.items()
            if not any(q.startswith((p + ".", p + "[")) for q in paths)
        ]
        raise SpecError(inner) from None
    found = problems(spec)
    if found:
        raise SpecError([source.diagnostic(path, msg, hint) for path, msg, hint in found])
    return spec


def load_spec(path: str | Path) -> tuple[Spec, SourceMap]:
    """Read, parse and validate a spec file."""
    data, source = load_file(path)
    return parse_spec(data, source), source


def load_spec_text(text: str, file: str = "<spec>") -> tuple[Spec, SourceMap]:
    data, source = load_text(text, file)
    return parse_spec(data, source), source


@contextmanager
def located_in(spec_path: str | Path) -> Iterator[None]:
    """Point a ``FieldError`` raised inside (by the planner: a missing trace, experts that do not
    fit) at its field in the spec file, as a ``SpecError`` like every other spec mistake."""
    try:
        yield
    except FieldError as exc:
        _, source = load_file(spec_path)
        diagnostic = source.diagnostic(parse_path(exc.path), exc.message, exc.hint)
        raise SpecError([diagnostic]) from None


def spec_to_data(spec: Spec) -> dict:
    """The spec as plain JSON-able data (every field, defaults included)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: Spec) -> str:
    """sha256 of the spec's canonical JSON: equal for specs that mean the same, whatever their spelling."""
    text = json.dumps(spec_to_data(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _tuples(value: Any) -> Any:
    """YAML lists become tuples: the spec's models are frozen and validate strictly."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


_FRIENDLY = {
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "tuple_type": "must be a list",
    "model_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "finite_number": "must be a finite number",
}


def _real_path(err: dict, data) -> tuple:
    """Pydantic adds union members to error paths (e.g. 'GpuProfile', 'literal[...]'); the user wrote
    neither, so keep only the parts that are keys or indices of the document (or the missing key).
    """
    loc = err["loc"]
    path, node = [], data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, dict) and err["type"] == "missing":
            pass  # a missing field: name it
        else:
            continue
        path.append(part)
    return tuple(path)


def _message(err: dict) -> str:
    kind = err["type"]
    message = _FRIENDLY.get(kind, err["msg"])
    if kind in ("too_short", "too_long"):
        limit = err["ctx"]["min_length" if kind == "too_short" else "max_length"]
        items = "item" if limit == 1 else "items"
        least = "least" if kind == "too_short" else "most"
        return f"must have at {least} {limit} {items} (got {err['ctx']['actual_length']})"
    if kind.startswith(("greater_than", "less_than", "literal_error", "value_error")):
        message = err["msg"].removeprefix("Value error, ")
        message = message[0].lower() + message[1:]
    return message


def _quote_hint(errs: list[dict], path: tuple, source: SourceMap) -> str | None:
    """YAML reads ``no`` as false and ``0`` as a number; where the field wanted that word as text
    (a string, or one of a literal's values), say to quote it."""
    got = errs[0].get("input")
    if not isinstance(got, (bool, int, float)):
        return None
    options = [
        word
        for err in errs
        if err["type"] == "literal_error"
        for word in re.findall(r"'([^']*)'", err["ctx"]["expected"])
    ]
    if isinstance(got, bool):
        word, what = source.booleans.get(path, str(got).lower()), f"the boolean {str(got).lower()}"
        wanted = word in options or any(err["type"] == "string_type" for err in errs)
    else:
        word, what = str(got), "a number"
        wanted = word in options
    key = path[-1] if path and isinstance(path[-1], str) else "value"
    return f'YAML reads {word} as {what}; quote it: {key}: "{word}"' if wanted else None


def _diagnostic(errs: list[dict], source: SourceMap, data):
    """One diagnostic for the errors of one field (several for a union: each member's, joined)."""
    err = errs[0]
    path = _real_path(err, data)
    kind = err["type"]
    message = " or ".join(dict.fromkeys(_message(e) for e in errs))
    got = err.get("input")
    hint = None
    if kind == "extra_forbidden":
        hint = _suggest(path, source)
    elif kind != "missing" and not isinstance(got, (dict, tuple, list)):
        message += f" (got {got!r})"
        if kind != "bool_type":
            hint = _quote_hint(errs, path, source)
    return source.diagnostic(path, message, hint)


def _suggest(path: tuple, source: SourceMap) -> str | None:
    """Name the closest known field, for an unknown key (typos are the common case)."""
    import difflib

    model: Any = Spec
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _model_of(field.annotation)
        if model is None:
            return None
    known = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(path[-1]), known, n=1) if path else []
    if close:
        return f"did you mean {close[0]!r}?"
    return "known fields: " + ", ".join(known)


def _model_of(annotation):
    import typing

    from pydantic import BaseModel

    stack = [annotation]
    while stack:
        ann = stack.pop()
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
        stack.extend(typing.get_args(ann))
    return None
