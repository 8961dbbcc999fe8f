"""Tile tables measured by ``moec tune``: read and validate the JSON it writes.

{"gpu": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
 "tables": [{"hidden": H, "ffn": F, "experts": E, "top_k": K, "weights": "dense",
             "buckets": {"16": {"up": {GemmConfig fields}, "down": {...}}, ...}}]}

``weights`` (optional, "dense" when absent, as in tables written before it existed) is how the
group's expert weights are stored: "dense" (in the activations' dtype) or the weight-only quantised
"int8", "int4" or "fp8"; a dense and an int8 group of the same shape get separate tiles.
"""

from __future__ import annotations

import json
from pathlib import Path

from moec.errors import UsageError

GEMM_FIELDS = {
    "block_m",
    "block_n",
    "block_k",
    "group_m",
    "num_warps",
    "num_stages",
    "tail_div",
    "fold_m",
}
POW2 = {"block_m", "block_n", "block_k"}
# the kernels' tail tiles, half or quarter height (optional field, default 2): the kernel library's
# configs.TAIL_DIVS, which the compiler renders as a template and does not import
TAIL_DIVS = (2, 4)
# rows of an expert's last block folded into the block before it (optional field, default 0 = off):
# configs.FOLD_MS
FOLD_MS = (0, 16, 32, 64)
WEIGHTS = ("dense", "int8", "int4", "fp8")

Table = tuple[tuple[tuple[int, int, int, int, str], tuple[tuple[int, dict], ...]], ...]


def load_tuning(path: Path) -> Table:
    """(((H, F, E, K, weights), ((bucket, {"up": {...}, "down": {...}}), ...)), ...), sorted;
    UsageError if bad."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    out = []
    for i, table in enumerate(_list(data, "tables", path)):
        where = f"{path}: tables[{i}]"
        try:
            shape = tuple(int(table[k]) for k in ("hidden", "ffn", "experts", "top_k"))
            weights = table.get("weights", "dense")
            if weights not in WEIGHTS:
                raise UsageError(
                    f"{where}.weights: must be one of {list(WEIGHTS)} (got {weights!r})"
                )
            buckets = tuple(
                sorted(
                    (int(b), _config(c, f"{where}.buckets[{b}]"))
                    for b, c in table["buckets"].items()
                )
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"{where}: malformed entry ({exc})") from None
        out.append(((*shape, weights), buckets))
    return tuple(sorted(out))


def tuning_gpu(path: Path) -> str:
    """The GPU a table (already read by ``load_tuning``) was measured on, or "" if it does not say."""
    gpu = json.loads(Path(path).read_text()).get("gpu", "")
    return gpu if isinstance(gpu, str) else ""


def _list(data, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UsageError(f"{path}: expected an object with a list '{key}'")
    return data[key]


def _config(config: dict, where: str) -> dict:
    out = {}
    for side in ("up", "down"):
        fields = config[side]
        if set(fields) - GEMM_FIELDS or not {"block_m", "block_n", "block_k"} <= set(fields):
            raise UsageError(f"{where}.{side}: fields must be {sorted(GEMM_FIELDS)}")
        for name, value in fields.items():
            if name == "fold_m":
                if not isinstance(value, int) or isinstance(value, bool) or value not in FOLD_MS:
                    raise UsageError(f"{where}.{side}.fold_m: must be one of {list(FOLD_MS)}")
                continue
            if not isinstance(value, int) or value < 1 or (name in POW2 and value & (value - 1)):
                raise UsageError(
                    f"{where}.{side}.{name}: must be a positive integer{' power of 2' if name in POW2 else ''}"
                )
            if name == "tail_div" and value not in TAIL_DIVS:
                raise UsageError(f"{where}.{side}.tail_div: must be one of {list(TAIL_DIVS)}")
        out[side] = dict(sorted(fields.items()))
    return out
