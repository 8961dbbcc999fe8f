"""Routing traces: how many tokens each expert received, and which experts were chosen together.

Legend: E experts, L layers, K top-k, T tokens.

A trace file is JSON::

    {"layers": [{"counts": [c_0, ..., c_{E-1}], "pairs": [[i, j, n], ...]}, ...]}

``counts[e]`` is the number of (token, expert) assignments expert ``e`` received; ``pairs`` (optional)
says that experts ``i`` and ``j`` were selected by the same token ``n`` times (unordered, ``i != j``).
Synthetic traces (uniform, Zipf-skewed) stand in when the user has no measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.errors import UsageError


class TraceError(UsageError):
    """A trace file that cannot be read; names the JSON path (``layers[2].pairs[5][1]``, or ``$``
    for the whole file, which the message leaves out): ``t.json: layers[2].counts: ...``."""

    def __init__(self, source: str, path: str, message: str):
        self.source = source
        self.path = path
        where = source if path == "$" else f"{source}: {path}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class LayerTrace:
    """One MoE layer's routing statistics.

    counts_E: assignments per expert (tokens x top-k summed), length E.
    pairs: ``(i, j, n)`` with ``i < j``: tokens that selected both ``i`` and ``j``; may be empty.
    """

    counts_E: tuple[float, ...]
    pairs: tuple[tuple[int, int, float], ...] = ()


@dataclass(frozen=True)
class Trace:
    """Per-layer routing statistics; every layer has the same number of experts E."""

    layers: tuple[LayerTrace, ...]

    @property
    def num_experts(self) -> int:
        return len(self.layers[0].counts_E)

    @property
    def has_pairs(self) -> bool:
        return any(layer.pairs for layer in self.layers)

    def counts_LE(self) -> np.ndarray:
        """Counts as a float array of shape ``[L, E]``."""
        return np.asarray([layer.counts_E for layer in self.layers], dtype=np.float64)


def _fail(source: str, path: str, message: str) -> TraceError:
    return TraceError(source, path, message)


def _number(value: object, source: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(source, path, f"must be a number (got {value!r})")
    if not np.isfinite(value) or value < 0:
        raise _fail(source, path, f"must be finite and >= 0 (got {value!r})")
    return float(value)


def _parse_pairs(raw: object, num_experts: int, source: str, path: str) -> tuple:
    if not isinstance(raw, list):
        raise _fail(source, path, f"must be a list of [i, j, n] (got {type(raw).__name__})")
    pairs = []
    for k, item in enumerate(raw):
        where = f"{path}[{k}]"
        if not isinstance(item, list) or len(item) != 3:
            raise _fail(source, where, f"must be [i, j, n] (got {item!r})")
        i, j = item[0], item[1]
        for pos, e in ((0, i), (1, j)):
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts:
                raise _fail(
                    source, f"{where}[{pos}]", f"must be an expert id in [0, {num_experts})"
                )
        if i == j:
            raise _fail(source, where, f"an expert cannot pair with itself (got {i}, {j})")
        n = _number(item[2], source, f"{where}[2]")
        pairs.append((min(i, j), max(i, j), n))
    return tuple(pairs)


def _parse_layer(raw: object, num_experts: int | None, source: str, path: str) -> LayerTrace:
    if not isinstance(raw, dict):
        raise _fail(source, path, f"must be an object (got {type(raw).__name__})")
    unknown = sorted(set(raw) - {"counts", "pairs"})
    if unknown:
        raise _fail(source, f"{path}.{unknown[0]}", "unknown key (expected counts, pairs)")
    if "counts" not in raw:
        raise _fail(source, f"{path}.counts", "is required")
    counts = raw["counts"]
    if not isinstance(counts, list) or not counts:
        raise _fail(source, f"{path}.counts", "must be a non-empty list of numbers")
    if num_experts is not None and len(counts) != num_experts:
        raise _fail(
            source, f"{path}.counts", f"has {len(counts)} experts; layers[0] has {num_experts}"
        )
    counts_E = tuple(_number(c, source, f"{path}.counts[{e}]") for e, c in enumerate(counts))
    pairs = _parse_pairs(raw.get("pairs", []), len(counts_E), source, f"{path}.pairs")
    return LayerTrace(counts_E, pairs)


def parse_trace(obj: object, source: str = "<trace>", num_experts: int | None = None) -> Trace:
    """Validate a decoded trace JSON object and return a :class:`Trace`.

    source: file name used in error messages. num_experts: expected E (from the spec), if known.
    Raises :class:`TraceError` naming the JSON path of the first problem.
    """
    if not isinstance(obj, dict) or set(obj) != {"layers"}:
        raise _fail(source, "$", 'must be an object with exactly one key "layers"')
    layers = obj["layers"]
    if not isinstance(layers, list) or not layers:
        raise _fail(source, "layers", "must be a non-empty list")
    parsed: list[LayerTrace] = []
    for idx, raw in enumerate(layers):
        expected = num_experts if not parsed else len(parsed[0].counts_E)
        parsed.append(_parse_layer(raw, expected, source, f"layers[{idx}]"))
    return Trace(tuple(parsed))


def load_trace(path: str | Path, num_experts: int | None = None) -> Trace:
    """Read and validate a trace JSON file (see the module docstring for the format)."""
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as exc:
        raise _fail(str(path), "$", f"cannot read the file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise _fail(str(path), "$", f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return parse_trace(obj, str(path), num_experts)


def dump_trace(trace: Trace) -> dict:
    """The JSON object of a trace (inverse of :func:`parse_trace`)."""
    layers = []
    for layer in trace.layers:
        entry: dict = {"counts": list(layer.counts_E)}
        if layer.pairs:
            entry["pairs"] = [list(p) for p in layer.pairs]
        layers.append(entry)
    return {"layers": layers}


def uniform_trace(num_experts: int, num_layers: int = 1, tokens: int = 4096, top_k: int = 1):
    """A trace where every expert gets the same share, ``tokens * top_k / E`` assignments."""
    share = tokens * top_k / num_experts
    return Trace(tuple(LayerTrace((share,) * num_experts) for _ in range(num_layers)))


def zipf_probs_E(num_experts: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Expert popularity ``p_E`` with ``p ∝ 1 / rank**exponent``, ranks shuffled by ``rng``."""
    weights = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** exponent
    return rng.permutation(weights / weights.sum())


def route_tokens_TK(
    probs_E: np.ndarray, tokens: int, top_k: int, rng: np.random.Generator, clusters: int = 0
) -> np.ndarray:
    """Sample ``top_k`` distinct experts per token (Gumbel top-k on ``log p``), shape ``[T, K]``.

    clusters > 0 gives each token a topic: the experts of one of ``clusters`` contiguous id blocks
    get a 4x boost, so experts in one block are co-selected more often (structure for affinity).
    """
    num_experts = probs_E.shape[0]
    logits_TE = np.broadcast_to(np.log(probs_E), (tokens, num_experts)).copy()
    if clusters > 0:
        block_E = np.arange(num_experts) * clusters // num_experts
        topic_T = rng.integers(0, clusters, size=tokens)
        logits_TE += np.log(4.0) * (block_E[None, :] == topic_T[:, None])
    logits_TE += rng.gumbel(size=logits_TE.shape)
    return np.argpartition(-logits_TE, top_k - 1, axis=1)[:, :top_k]


def trace_from_routing(ids_TK: np.ndarray, num_experts: int, with_pairs: bool) -> LayerTrace:
    """Counts (and co-selection pairs) of one layer from sampled routing ``ids_TK``."""
    counts_E = np.bincount(ids_TK.ravel(), minlength=num_experts).astype(np.float64)
    if not with_pairs:
        return LayerTrace(tuple(counts_E.tolist()))
    onehot_TE = np.zeros((ids_TK.shape[0], num_experts), dtype=np.float64)
    np.put_along_axis(onehot_TE, ids_TK, 1.0, axis=1)
    co_EE = onehot_TE.T @ onehot_TE
    ii, jj = np.nonzero(np.triu(co_EE, k=1))
    pairs = tuple(zip(ii.tolist(), jj.tolist(), co_EE[ii, jj].tolist(), strict=True))
    return LayerTrace(tuple(counts_E.tolist()), pairs)


def zipf_trace(
    num_experts: int,
    exponent: float = 1.0,
    num_layers: int = 1,
    tokens: int = 4096,
    top_k: int = 1,
    seed: int = 0,
    with_pairs: bool = False,
    clusters: int = 0,
) -> Trace:
    """A seeded Zipf-skewed trace: each layer shuffles which experts are hot.

    exponent 0 is uniform in expectation; ~1 is strongly skewed. tokens x top_k assignments per
    layer are sampled (so counts are integers); ``with_pairs`` also records co-selection.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}] (got {top_k})")
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(num_layers):
        probs_E = zipf_probs_E(num_experts, exponent, rng)
        ids_TK = route_tokens_TK(probs_E, tokens, top_k, rng, clusters)
        layers.append(trace_from_routing(ids_TK, num_experts, with_pairs))
    return Trace(tuple(layers))


def coselection_EE(layer: LayerTrace, top_k: int = 2) -> np.ndarray:
    """Symmetric co-selection weights ``[E, E]`` (zero diagonal) of one layer.

    Uses the recorded pairs when the trace has them; otherwise assumes experts are picked
    independently: ``w_ij ∝ c_i * c_j``, scaled so the total equals ``T * K * (K - 1) / 2`` pairs
    with ``T = sum(c) / K``. top_k is only used for that estimate.
    """
    num_experts = len(layer.counts_E)
    co_EE = np.zeros((num_experts, num_experts), dtype=np.float64)
    if layer.pairs:
        arr = np.asarray(layer.pairs, dtype=np.float64)
        i, j = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
        np.add.at(co_EE, (i, j), arr[:, 2])
        return co_EE + co_EE.T
    if top_k < 2:
        return co_EE
    counts_E = np.asarray(layer.counts_E, dtype=np.float64)
    outer = np.outer(counts_E, counts_E)
    np.fill_diagonal(outer, 0.0)
    total = counts_E.sum() / top_k * top_k * (top_k - 1)  # ordered pairs, both directions
    return outer * (total / outer.sum()) if outer.sum() > 0 else outer
